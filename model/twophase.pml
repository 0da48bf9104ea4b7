/*
 * Two-phase commit across two participant databases, presumed abort, with the decision
 * logged in the coordinator's ledger (eos_airflow/protocol/twophase.py, recovery.py).
 *
 * Two attempts of one key (try 1 may be a zombie: try 2 claims while it still runs) each
 * open a transaction at both participants, prepare them, then try to log the `commit`
 * decision for their global transaction -- in the same coordinator transaction as the key's
 * ledger commit, fenced: only the key's owner, only while nobody decided that transaction,
 * only if the key is not committed yet. Then COMMIT PREPARED at both participants.
 * Recovery (`eos-airflow recover`, or the next attempt right after its claim) finishes what
 * is prepared: commit where the decision is `commit`; where there is none, it first logs
 * `abort` (so a late decision is refused) and rolls back.
 * Attempts crash at any point: unprepared work rolls back, prepared work stays in doubt.
 *
 * -DUNLOGGED_ABORT: recovery rolls an undecided transaction back without logging `abort`
 * first; the search then finds an attempt deciding `commit` after one participant rolled back.
 *
 * Checked: atomicity (no transaction committed at one participant and rolled back at the
 * other), at most one attempt's writes committed, no commit without a `commit` decision,
 * decisions never change; and (liveness, weak fairness) nothing stays prepared.
 */

#define A 2                 /* attempts (global transactions) */
#define P 2                 /* participants */
#define CRASHES 1

mtype = { IDLE, ACTIVE, PREPARED, COMMITTED, ABORTED };
mtype = { NONE, COMMIT, ABORT };

mtype part[A * P];          /* part[a*P + i]: attempt a's transaction at participant i */
mtype decision[A];          /* coordinator decision log, per global transaction */
byte owner = 0;             /* attempt (1-based) owning the key in the coordinator ledger */
bool key_committed = false;
byte committed_attempts = 0;
byte crashes = 0;
bool finished[A];

#define st(a, i) part[(a) * P + (i)]

inline crash_point(a) {
    if
    :: atomic { crashes < CRASHES -> crashes++ }; goto crashed
    :: true -> skip
    fi
}

proctype Attempt(byte a) {     /* a = 0 .. A-1; its try number is a + 1 */
    byte i;
    atomic {                   /* claim: a higher try takes over (fences the lower one) */
        if
        :: key_committed -> goto done
        :: owner > a + 1 -> goto done          /* fenced at claim */
        :: else -> owner = a + 1
        fi
    }
    i = 0;
    do :: i < P -> st(a, i) = ACTIVE; i++ :: else -> break od;     /* run: writes */
    crash_point(a);
    i = 0;
    do                                            /* prepare every participant */
    :: i < P ->
        if
        :: st(a, i) = PREPARED
        :: atomic { st(a, i) = ABORTED; goto refuse }   /* PREPARE fails (constraint) */
        fi;
        crash_point(a);                           /* after_prepare */
        i++
    :: else -> break
    od;
    atomic {                                      /* decide: the commit point */
        if
        :: owner == a + 1 && decision[a] == NONE && !key_committed ->
            decision[a] = COMMIT; key_committed = true
        :: else -> goto refuse                    /* fenced, or recovery aborted it */
        fi
    }
    crash_point(a);                               /* after_decision */
    i = 0;
    do
    :: i < P -> st(a, i) = COMMITTED; crash_point(a); i++   /* after_first_commit_prepared */
    :: else -> break
    od;
    goto done;
refuse:                                           /* roll back whatever is prepared */
    atomic {
        if :: decision[a] == NONE -> decision[a] = ABORT :: else -> skip fi;
        i = 0;
        do
        :: i < P -> if :: st(a, i) == PREPARED || st(a, i) == ACTIVE -> st(a, i) = ABORTED
                       :: else -> skip fi; i++
        :: else -> break
        od
    }
    goto done;
crashed:                                          /* unprepared work dies with the session */
    atomic {
        i = 0;
        do
        :: i < P -> if :: st(a, i) == ACTIVE -> st(a, i) = ABORTED :: else -> skip fi; i++
        :: else -> break
        od
    }
done:
    finished[a] = true
}

/* recover / the next attempt: finish one participant's prepared transaction at a time */
proctype Recovery() {
    byte a, i;
    do
    :: atomic {
        select(a : 0 .. A - 1); select(i : 0 .. P - 1);
        st(a, i) == PREPARED ->
            if
            :: decision[a] == COMMIT -> st(a, i) = COMMITTED
            :: decision[a] == ABORT -> st(a, i) = ABORTED
#ifdef UNLOGGED_ABORT
            /* the flaw this guards against: roll back without logging the abort first */
            :: decision[a] == NONE -> st(a, i) = ABORTED
#else
            :: decision[a] == NONE -> decision[a] = ABORT; st(a, i) = ABORTED  /* presumed abort */
#endif
            fi
       }
    :: finished[0] && finished[1] && !(st(0,0) == PREPARED || st(0,1) == PREPARED
                                       || st(1,0) == PREPARED || st(1,1) == PREPARED) -> break
    od
}

#define atomic_ok(a) (!((st(a,0) == COMMITTED && st(a,1) == ABORTED) || \
                        (st(a,0) == ABORTED && st(a,1) == COMMITTED)))
#define commit_decided(a) (!(st(a,0) == COMMITTED || st(a,1) == COMMITTED) || decision[a] == COMMIT)
#define none_prepared (st(0,0) != PREPARED && st(0,1) != PREPARED && \
                       st(1,0) != PREPARED && st(1,1) != PREPARED)

ltl atomicity { [] (atomic_ok(0) && atomic_ok(1) && commit_decided(0) && commit_decided(1)
                    && !(decision[0] == COMMIT && decision[1] == COMMIT)) }
ltl no_in_doubt_left { <> [] none_prepared }

init {
    byte k;
    k = 0;
    do :: k < A * P -> part[k] = IDLE; k++ :: else -> break od;
    decision[0] = NONE; decision[1] = NONE;
    atomic { run Attempt(0); run Attempt(1); run Recovery() }
}
