/*
 * Two-phase commit across two participant databases, presumed abort, with the decision
 * logged in the coordinator's ledger (eos_airflow/protocol/twophase.py, recovery.py), and
 * everything that may finish another attempt's transaction: `eos-airflow recover`, a run
 * that skips the committed key, and the next try right after its claim.
 *
 * Processes
 * - Attempt(0), Attempt(1): tries 1 and 2 of one task instance. Try 2 takes the key over
 *   even while try 1 still runs (a zombie); try 1 claiming after try 2 is fenced. Each
 *   claims (the claim and its transaction-id log row in one durable coordinator
 *   transaction), finishes the key's earlier transactions (claim path), opens a transaction
 *   at both participants, PREPAREs them, decides `commit` (fenced: only the key's owner,
 *   only while nobody decided the txid), then COMMIT PREPARED everywhere.
 *   Faults (CRASHES in all): the process dies (unprepared work rolls back, prepared work
 *   stays in doubt); it loses only its coordinator session (its claim's lock is free, it
 *   goes on with its participant connections and cannot decide); the coordinator server
 *   crashes (every coordinator session ends).
 * - Skipper: another run of the key that finds it committed (skip path) and finishes the
 *   key's unresolved transactions that are decided or whose attempt is gone.
 * - Recover: `eos-airflow recover`, run again and again: finishes decided transactions;
 *   aborts (logs `abort` first, then rolls back) an undecided one only when its attempt's
 *   session is gone (owner_alive() false); also scans the participants for prepared
 *   transactions of aborted or abandoned txids (whatever the log says is resolved).
 * - Monitor: the safety invariant, checked in every state.
 * `replacing` (chosen at start): the key was committed before and both tries run with
 * on_committed="replace", so the skipping run can meet a live replace attempt.
 *
 * Properties
 * - INV (Monitor, and ltl `safety`): per txid, no participant committed while another
 *   rolled back (atomicity); a participant commits only with a `commit` decision, so a
 *   txid decided `abort` never commits; no participant commits two attempts' writes (unless
 *   replacing); decisions never change (asserted where they are written).
 * - an attempt that owns the key and is alive is never aborted by someone else
 *   (assert in finish()): that is the rule of docs/guarantees.md, "Operator actions and
 *   other runs"; breaking it fails a live effect.
 * - at the end (Recover's last step): nothing is left prepared, every `commit` decision
 *   committed at every participant (a committed effect is never lost). A prepared
 *   transaction nobody can find leaves Recover blocked: an invalid end state.
 * - ltl `no_in_doubt_left` (weak fairness): eventually nothing stays prepared.
 *
 * Flawed variants (each must yield a counterexample; they reproduce earlier or current
 * behaviour):
 *   -DGRACE_FROM_CLAIM     recover ignores the owner's liveness (the grace period counted from
 *                          the claim expires while a slow attempt still runs)
 *   -DSKIP_ABORTS_LIVE     the skip path aborts every unresolved transaction of the key
 *   -DNONDURABLE_CLAIM     the claim and its txid log commit asynchronously: a coordinator
 *                          crash loses them while the participants keep their PREPAREs; with
 *                          recover reading only the decision log (as it then did)
 *   -DOWNER_FINISHES_ALL   the claim path aborts every other transaction of the key, also one
 *                          it finds prepared later on a participant (a newer, live try's)
 *   -DRECOVER_LOG_ONLY     recover reads only the decision log: a txid it aborted and marked
 *                          resolved before its attempt (coordinator session lost) PREPAREd
 *                          leaves an orphan prepared transaction
 *   -DUNLOGGED_ABORT       recovery rolls an undecided transaction back without logging abort
 *                          (with recover misjudging a live attempt as abandoned, as under
 *                          -DGRACE_FROM_CLAIM, and without the rule's assertion: the logged
 *                          abort is what then keeps the late decision out)
 */

#define A 2                 /* attempts: tries 1 and 2 of one task instance */
#define P 2                 /* participants */
#ifndef CRASHES
#define CRASHES 1
#endif

#ifdef NONDURABLE_CLAIM
#define RECOVER_LOG_ONLY
#endif
#ifdef UNLOGGED_ABORT
#define GRACE_FROM_CLAIM    /* what the logged abort guards: a recovery that misjudges */
#endif

mtype = { IDLE, ACTIVE, PREPARED, COMMITTED, ABORTED };
mtype = { NONE, COMMIT, ABORT };

mtype part[A * P];          /* part[a*P + i]: attempt a's transaction at participant i */
mtype decision[A];          /* coordinator decision log, per global transaction */
bool logged[A];             /* the txid's row is in the decision log */
bool durable[A];            /* ... and on disk */
bool resolved[A];           /* its outcome is recorded (recover skips it) */
bool alive[A];              /* its session holds the claim's lock: owner_alive() */
byte owner = 0;             /* attempt (1-based) owning the key in the coordinator ledger */
bool row_exists = false;    /* the key's ledger row */
bool row_durable = false;
bool replacing = false;     /* the key holds an earlier committed version: tries replace it */
bool key_committed = false; /* the key is committed (an earlier version, or this one) */
byte crashes = 0;
bool finished[A];
bool skipper_done = false;

#define BY_CLAIM 1
#define BY_CLAIM_SCAN 2
#define BY_SKIPPER 3
#define BY_RECOVER 4
#define BY_RECOVER_SCAN 5

#define st(a, i) part[(a) * P + (i)]
#define abandoned(b) (!alive[b])
#define none_prepared (st(0,0) != PREPARED && st(0,1) != PREPARED && \
                       st(1,0) != PREPARED && st(1,1) != PREPARED)
#define atomic_ok(a) (!((st(a,0) == COMMITTED && st(a,1) == ABORTED) || \
                        (st(a,0) == ABORTED && st(a,1) == COMMITTED)))
#define commit_decided(a) (!(st(a,0) == COMMITTED || st(a,1) == COMMITTED) || decision[a] == COMMIT)
#define once_at(i) (replacing || !(st(0,i) == COMMITTED && st(1,i) == COMMITTED))
#define INV (atomic_ok(0) && atomic_ok(1) && commit_decided(0) && commit_decided(1) \
             && once_at(0) && once_at(1))

/* every synchronous coordinator commit flushes the WAL written before it */
inline flush() {
    row_durable = row_exists;
    durable[0] = logged[0]; durable[1] = logged[1]
}

/* finish transaction b for someone who is not its attempt (recover, a skipping run, the
 * claim path): log abort unless decided (a late decision is then refused), then COMMIT or
 * ROLLBACK PREPARED wherever it is prepared, and record the outcome. */
inline finish(b, who) {
    if
    :: decision[b] == NONE ->
#ifndef UNLOGGED_ABORT
        /* the rule: only an abandoned attempt's transaction is aborted by others */
        assert(!(alive[b] && owner == b + 1));
#endif
#ifndef UNLOGGED_ABORT
        decision[b] = ABORT;
#endif
        printf("MSC: finisher %d (1 claim path, 2 its scan, 3 skipping run, 4 recover, 5 its participant scan) aborts txid %d\n", who, b)
    :: else -> skip
    fi;
    if
    :: st(b, 0) == PREPARED -> st(b, 0) = (decision[b] == COMMIT -> COMMITTED : ABORTED)
    :: else -> skip
    fi;
    if
    :: st(b, 1) == PREPARED -> st(b, 1) = (decision[b] == COMMIT -> COMMITTED : ABORTED)
    :: else -> skip
    fi;
    resolved[b] = logged[b]
}

inline fault(a) {
    if
    :: crashes < CRASHES -> crashes++; alive[a] = false; goto crashed   /* process dies */
#ifndef NONDURABLE_CLAIM  /* (that variant shows the coordinator crash's own counterexample) */
    :: crashes < CRASHES && alive[a] ->      /* only its coordinator session is lost */
        crashes++; alive[a] = false; printf("MSC: attempt %d lost its coordinator session\n", a)
#endif
    :: crashes < CRASHES ->                  /* the coordinator server crashes */
        crashes++; alive[0] = false; alive[1] = false;
        if
        :: !row_durable && row_exists -> row_exists = false; owner = 0;
           printf("MSC: coordinator crash lost the claim\n")
        :: else -> skip
        fi;
        if
        :: logged[0] && !durable[0] -> logged[0] = false; printf("MSC: coordinator crash lost the log of txid 0\n")
        :: else -> skip
        fi;
        if
        :: logged[1] && !durable[1] -> logged[1] = false; printf("MSC: coordinator crash lost the log of txid 1\n")
        :: else -> skip
        fi
    :: true -> skip
    fi
}

#define crash_point(a) atomic { fault(a) }

proctype Attempt(byte a) {     /* a = 0 .. A-1; its try number is a + 1 */
    byte i;
    byte b = 1 - a;            /* the other attempt */
    bool prior, others;
    atomic {                   /* claim + log the txid (twophase_claim) */
        if
        :: key_committed && !replacing -> goto done               /* skip (see Skipper) */
        :: owner > a + 1 -> goto done                             /* fenced at claim */
        :: else ->
            prior = row_exists;
            others = logged[b] && !resolved[b];
            owner = a + 1; alive[a] = true; row_exists = true; logged[a] = true;
#ifndef NONDURABLE_CLAIM
            flush()                                               /* synchronous_commit on */
#endif
        fi
    }
    /* claim path: finish the key's other transactions (finish_for_key, scan when the key
     * had a row); the default finishes only decided or abandoned ones */
    if
    :: prior || others ->
        atomic {
            if
            :: others && (decision[b] != NONE || abandoned(b)
#ifdef OWNER_FINISHES_ALL
                          || true
#endif
                         ) -> finish(b, BY_CLAIM)
            :: else -> skip
            fi
        }
        atomic {               /* the scan of the participants, a little later */
            if
            :: (st(b, 0) == PREPARED || st(b, 1) == PREPARED) && (decision[b] != NONE || abandoned(b)
#ifdef OWNER_FINISHES_ALL
                          || true
#endif
                         ) -> finish(b, BY_CLAIM_SCAN)
            :: else -> skip
            fi
        }
    :: else -> skip
    fi;
    atomic { st(a, 0) = ACTIVE; st(a, 1) = ACTIVE }    /* run: the function writes */
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
        :: !alive[a] -> goto in_doubt             /* coordinator unreachable: in doubt */
        :: alive[a] && owner == a + 1 && decision[a] == NONE ->
            assert(decision[a] == NONE);
            decision[a] = COMMIT; key_committed = true; flush()
        :: else -> goto refuse                    /* fenced (EOS01), or aborted (EOS07) */
        fi
    }
    crash_point(a);                               /* after_decision */
    i = 0;
    do
    :: i < P ->
        atomic {            /* finish_prepared: not prepared any more = finished by others */
            if
            :: st(a, i) == PREPARED -> st(a, i) = COMMITTED
            :: else -> assert(st(a, i) == COMMITTED)
            fi
        }
        crash_point(a);                           /* after_first_commit_prepared */
        i++
    :: else -> break
    od;
    atomic { if :: alive[a] -> resolved[a] = true :: else -> skip fi };
    goto done;
refuse:                                           /* roll back whatever is prepared */
    atomic {
        if
        :: alive[a] && decision[a] == NONE -> decision[a] = ABORT; flush()
        :: else -> skip   /* could not log the abort: roll back anyway (presumed abort) */
        fi;
        assert(decision[a] != COMMIT);
        i = 0;
        do
        :: i < P -> if :: st(a, i) == PREPARED || st(a, i) == ACTIVE -> st(a, i) = ABORTED
                       :: else -> skip fi; i++
        :: else -> break
        od;
        if :: alive[a] -> resolved[a] = true :: else -> skip fi
    }
    goto done;
in_doubt:                                         /* leave the prepared work in doubt */
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
    atomic { alive[a] = false; finished[a] = true }
}

/* another run of the key that finds it committed: the skip path (twophase_unresolved_key,
 * then finish_for_key without a scan) */
proctype Skipper() {
    bool rows[A];
    byte b;
    atomic {
        if
        :: key_committed ->
            flush();                              /* the skip is logged synchronously */
            b = 0;
            do
            :: b < A ->
                rows[b] = logged[b] && !resolved[b] && (decision[b] != NONE || abandoned(b)
#ifdef SKIP_ABORTS_LIVE
                                                        || true
#endif
                                                       );
                b++
            :: else -> break
            od
        :: else -> goto gone       /* not committed: it would wait or run (like a next try) */
        fi
    }
    b = 0;
    do
    :: b < A -> atomic { if :: rows[b] -> finish(b, BY_SKIPPER) :: else -> skip fi }; b++
    :: else -> break
    od;
gone:
    skipper_done = true
}

/* eos-airflow recover, run repeatedly; its last step checks the end state */
#ifdef GRACE_FROM_CLAIM
#define may_abort(b) true      /* the grace period (from the claim) expired: owner not asked */
#else
#define may_abort(b) abandoned(b)
#endif
/* from the decision log: a decided transaction, or an undecided one whose attempt is gone */
#define log_finishable(b) (logged[b] && !resolved[b] && (decision[b] != NONE || may_abort(b)))
/* from the participants: a prepared gid of an aborted, unlogged or abandoned txid */
#define scan_finishable(b) ((st(b, 0) == PREPARED || st(b, 1) == PREPARED) && \
                            (resolved[b] || !logged[b] || decision[b] != NONE || abandoned(b)))

/* eos-airflow recover, run repeatedly; its last step checks the end state */
proctype Recover() {
    do
    :: atomic { log_finishable(0) -> finish(0, BY_RECOVER) }
    :: atomic { log_finishable(1) -> finish(1, BY_RECOVER) }
#ifndef RECOVER_LOG_ONLY
    :: atomic { scan_finishable(0) -> finish(0, BY_RECOVER_SCAN) }
    :: atomic { scan_finishable(1) -> finish(1, BY_RECOVER_SCAN) }
#endif
    :: atomic {
        finished[0] && finished[1] && skipper_done && none_prepared ->
            /* a committed decision is never lost: it committed everywhere */
            assert(decision[0] != COMMIT || (st(0,0) == COMMITTED && st(0,1) == COMMITTED));
            assert(decision[1] != COMMIT || (st(1,0) == COMMITTED && st(1,1) == COMMITTED));
            break
       }
    od
}

proctype Monitor() {
end_monitor:
    atomic { !(INV) -> assert(INV) }
}

ltl safety { [] INV }
ltl no_in_doubt_left { <> [] none_prepared }

init {
    atomic {
        part[0] = IDLE; part[1] = IDLE; part[2] = IDLE; part[3] = IDLE;
        decision[0] = NONE; decision[1] = NONE;
        if
        :: replacing = false
        :: replacing = true; key_committed = true; row_exists = true; row_durable = true
        fi;
        run Monitor(); run Attempt(0); run Attempt(1); run Skipper(); run Recover()
    }
}
