/*
 * Three-phase commit as eos-airflow implements it (protocol="3pc"; eos_airflow/protocol/
 * twophase.py, recovery.py resolve() and terminate(); docs/twophase.md), with the
 * termination protocol run on the participants alone.
 *
 * Coordinator (one attempt): opens a transaction at each participant, PREPAREs them in
 * turn, then in ONE coordinator transaction decides `commit` and writes a `precommitted`
 * vote at every participant in participant order (each vote commits at its participant at
 * once); when a participant's vote in force is not `precommitted` the coordinator's
 * transaction rolls back: before any pre-commit it logs `abort` and rolls its participants
 * back, after one it leaves them in doubt for the termination protocol. It then commits its
 * transaction (the decision is durable) and COMMIT PREPAREs everywhere. It may crash at every
 * step (crash-stop): unprepared work rolls back, the uncommitted decision is lost, prepared
 * work and written votes stay.
 * Votes: one per participant; whichever of `precommitted` and `aborted` is written first wins.
 * Terminator (`eos-airflow recover --terminate`, twice, concurrently with the coordinator,
 * and once more at the end): reads the participants' votes; any `precommitted` -> commit
 * everywhere; else any `aborted` -> abort; else (after the grace period) write `aborted`
 * votes in participant order, and commit instead when a vote in force is `precommitted`
 * (the first participant's vote decides a race with a late coordinator). Then COMMIT or
 * ROLLBACK PREPARED at the participants it reaches.
 *
 * Checked: INV (Monitor, and ltl `safety`): no participant committed while another rolled
 * back; nothing commits unless the first participant pre-committed; a transaction whose
 * decision is logged `abort` never commits. At the end (the last terminator): nothing stays
 * prepared (3PC does not block), a logged `commit` committed everywhere. ltl
 * `no_in_doubt_left` (weak fairness): eventually nothing stays prepared.
 *
 * -DPARTITION: a network partition, the documented unsafety: one terminator reaches only the
 * last participant (it was not given the first, or cannot reach it), finds no pre-commit
 * there and aborts it while the coordinator, still alive, pre-commits the first: the
 * participants decide differently (a counterexample).
 */

#ifndef P
#define P 3                 /* participants */
#endif
#define CRASHES 1

mtype = { IDLE, ACTIVE, PREPARED, COMMITTED, ABORTED };   /* a participant's transaction */
mtype = { NOVOTE, PRE, ABT };                             /* its 3PC vote */
mtype = { NONE, COMMIT, ABORT };                          /* the coordinator's log */

mtype part[P];
mtype vote[P];
mtype decision = NONE;
byte crashes = 0;
bool coord_done = false;
byte terminators_done = 0;

#define some(s) (part[0] == s || part[1] == s || (P > 2 && part[P - 1] == s))
#define INV (!(some(COMMITTED) && some(ABORTED)) && (!some(COMMITTED) || vote[0] == PRE) \
             && !(decision == ABORT && some(COMMITTED)))

inline crash_point() {
    if
    :: atomic { crashes < CRASHES -> crashes++ }; goto crashed
    :: true -> skip
    fi
}

/* the vote in force at participant i after trying to write v (precommit_vote) */
inline write_vote(i, v) {
    if :: vote[i] == NOVOTE -> vote[i] = v :: else -> skip fi
}

proctype Coordinator() {
    byte i;
    bool precommitted = false;
    atomic { i = 0; do :: i < P -> part[i] = ACTIVE; i++ :: else -> break od }   /* run */
    crash_point();
    i = 0;
    do                                            /* prepare every participant */
    :: i < P ->
        if
        :: part[i] = PREPARED
        :: atomic { part[i] = ABORTED; goto refuse }   /* PREPARE refused */
        fi;
        crash_point();
        i++
    :: else -> break
    od;
    i = 0;                                        /* the decision transaction: votes */
    do
    :: i < P ->
        atomic {
            write_vote(i, PRE);
            if
            :: vote[i] == PRE -> precommitted = true
            :: else ->                            /* a terminator aborted it first */
                if :: precommitted -> goto in_doubt :: else -> goto refuse fi
            fi
        }
        crash_point();                            /* after_precommit (crash: decision lost) */
        i++
    :: else -> break
    od;
    atomic { assert(decision == NONE); decision = COMMIT }  /* the decision transaction commits */
    crash_point();                                /* after_decision */
    i = 0;
    do
    :: i < P ->
        atomic {
            if
            :: part[i] == PREPARED -> part[i] = COMMITTED
            :: else -> assert(part[i] == COMMITTED)      /* a terminator finished it */
            fi
        }
        crash_point();
        i++
    :: else -> break
    od;
    goto done;
refuse:                                           /* log abort, roll back what is prepared */
    atomic {
        assert(decision == NONE); decision = ABORT;
        i = 0;
        do
        :: i < P -> if :: part[i] == PREPARED || part[i] == ACTIVE -> part[i] = ABORTED
                       :: else -> skip fi; i++
        :: else -> break
        od
    }
    goto done;
in_doubt:
    goto done;
crashed:
    atomic {
        i = 0;
        do
        :: i < P -> if :: part[i] == ACTIVE -> part[i] = ABORTED :: else -> skip fi; i++
        :: else -> break
        od
    }
done:
    coord_done = true
}

/* recover --terminate given the participants first .. P-1 (first = 0: all of them) */
proctype Terminator(byte first; bool last) {
    byte i;
    bool pre = false, abt = false, commit = false;
    if
    :: last -> coord_done && terminators_done == 2     /* the final run, after the others */
    :: !last && some(PREPARED) -> skip                  /* finds a prepared transaction */
    :: !last && coord_done && !some(PREPARED) -> goto finished   /* found nothing */
    fi;
    i = first;
    do                                            /* read the votes, one participant at a time */
    :: i < P -> atomic { pre = pre || vote[i] == PRE; abt = abt || vote[i] == ABT }; i++
    :: else -> break
    od;
    if
    :: pre -> commit = true
    :: !pre && abt -> commit = false
    :: !pre && !abt ->                            /* grace over: abort, in participant order */
        i = first;
        do
        :: i < P ->
            atomic {
                write_vote(i, ABT);
                if :: vote[i] == PRE -> commit = true; i = P :: else -> i++ fi
            }
        :: else -> break
        od
    fi;
    i = first;
    do                                            /* finish what it reaches */
    :: i < P ->
        atomic {
            if
            :: part[i] == PREPARED -> part[i] = (commit -> COMMITTED : ABORTED)
            :: else -> skip
            fi
        }
        i++
    :: else -> break
    od;
    if
    :: last ->
        atomic {
            assert(!some(PREPARED));              /* non-blocking: nothing stays in doubt */
            assert(decision != COMMIT || (part[0] == COMMITTED && part[1] == COMMITTED
                                          && part[P - 1] == COMMITTED))
        }
    :: else -> skip
    fi;
finished:
    terminators_done++
}

proctype Monitor() {
end_monitor:
    atomic { !(INV) -> assert(INV) }
}

ltl safety { [] INV }
ltl no_in_doubt_left { <> [] !some(PREPARED) }

init {
    byte k;
    atomic {
        k = 0;
        do :: k < P -> part[k] = IDLE; vote[k] = NOVOTE; k++ :: else -> break od;
        run Monitor(); run Coordinator();
#ifdef PARTITION
        run Terminator(P - 1, false);             /* reaches only the last participant */
#else
        run Terminator(0, false);
#endif
        run Terminator(0, false);
        run Terminator(0, true)
    }
}
