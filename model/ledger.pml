/*
 * The single-database protocol of eos-airflow: claim -> run -> commit, with fencing.
 *
 * One effect key. Airflow runs tries 1..TRIES of one task instance (a try starts when the
 * previous one crashed, failed or was declared dead -- possibly while it still runs: a zombie),
 * and OTHER runs of a second origin (another DAG run keyed to the same partition). Each step of
 * the ledger is one SQL function under the key's row lock, so each is atomic here.
 * Any attempt may crash at any point: its open transaction rolls back and PostgreSQL ends its
 * session, which frees its advisory lock (alive[i] = false).
 *
 * Compile with -DROW_ONLY_FENCING to see the counterexample that schema revision 0008 fixed:
 * a lower try committing after a higher try claimed the key, once the higher try released it
 * or another origin took it over in between.
 *
 * Checked: at most one attempt's writes ever become visible (at_most_once), a lower try never
 * commits after a higher try claimed the key (fencing), no invalid end state (every attempt
 * ends committed, skipped, fenced, failed or crashed), and -- with a crash budget -- the key
 * ends committed (eventually_once, under weak fairness).
 */

#define TRIES  4          /* tries of the task instance: attempts 1..TRIES */
#define ZOMBIES 1         /* tries declared dead while still running */
#define OTHERS 1          /* attempts of another origin: ids TRIES+1 .. TRIES+OTHERS */
#define N      (TRIES + OTHERS)
#define CRASHES 1         /* crash budget (SIGKILL, lost session) */
#define FAILURES 1        /* user-code failures (exception, rolled back, released) */

mtype = { NONE, RUNNING, COMMITTED, FAILED };

/* the ledger row */
mtype state = NONE;
byte owner = 0;           /* attempt id holding the key, 0 = none */
byte owner_try = 0;       /* try number of the owner (0 for other origins) */
byte max_claimed_try = 0; /* highest try of the task instance that claimed */

/* what readers of the target table can see */
byte visible_writes = 0;
byte committed_by = 0;

bool alive[N + 1];
bool started[N + 1];
bool ended[N + 1];        /* the attempt finished: committed, skipped, fenced, failed, crashed */
byte crashes = 0;
byte failures = 0;
bool done = false;        /* the key reached COMMITTED */

#define same_ti(a) ((a) <= TRIES)

inline crash_point(i) {
    if
    :: atomic { crashes < CRASHES -> crashes++; alive[i] = false }; goto crashed
    :: true -> skip
    fi
}

proctype Attempt(byte i) {
    bool wrote = false;
    bool held, lower, newer;
    alive[i] = true;
    crash_point(i);
claim:
    atomic {
        if
        :: state == COMMITTED -> goto skipped
        :: else -> skip
        fi;
        held = (owner != 0 && owner != i);
#ifdef ROW_ONLY_FENCING
        /* schema revisions before 0008: only a live higher owner fenced a lower try */
        lower = (held && same_ti(i) && same_ti(owner) && i < owner_try);
#else
        /* revision 0008: the highest try of the task instance that ever claimed the key */
        lower = (same_ti(i) && i < max_claimed_try);
#endif
        newer = (same_ti(i) && same_ti(owner) && i > owner_try);
        if
        :: lower -> goto fenced
        :: held && !newer && alive[owner] ->
            /* another live attempt of another origin owns it: wait on its session lock */
            goto wait
        :: else ->
            owner = i;
            owner_try = (same_ti(i) -> i : 0);
            if
            :: same_ti(i) && i > max_claimed_try -> max_claimed_try = i
            :: else -> skip
            fi;
            state = (state == COMMITTED -> COMMITTED : RUNNING)
        fi
    }
    crash_point(i);
    /* run: the user's writes, inside the effect's open transaction (not visible) */
    wrote = true;
    crash_point(i);
    if
    :: atomic { failures < FAILURES -> failures++ }; goto failed   /* user code raised */
    :: true -> skip
    fi;
    /* commit(): fenced by the owner token, then COMMIT makes the writes visible */
    atomic {
        if
        :: owner == i ->
            assert(!same_ti(i) || i >= max_claimed_try);   /* fencing */
            assert(visible_writes == 0);                      /* at most once */
            state = COMMITTED; owner = 0;
            visible_writes++; committed_by = i; done = true
        :: else -> goto fenced   /* EOS01: the transaction, writes included, rolls back */
        fi
    }
    goto finished;
wait:
    (!alive[owner] || owner == 0 || state == COMMITTED);   /* lock wait, bounded in reality */
    goto claim;
failed:   /* release(): the transaction rolled back; record it and free the key */
fenced:
    atomic { if :: owner == i -> owner = 0; state = FAILED :: else -> skip fi }
    goto finished;
skipped:
    goto finished;
crashed:
    /* the session ended: the advisory lock is gone; the row still names this owner until a
       newer try or another origin takes it over */
    skip;
finished:
    ended[i] = true
}

/* Airflow: the next try starts when the newest one ended without committing (a retry), or at
   any moment before that because Airflow declared the newest try dead while it still runs (a
   zombie), so tries may overlap. Retries stop at TRIES. */
proctype Scheduler() {
    byte t = 1;
    byte zombies = 0;
    started[1] = true; run Attempt(1);
    do
    :: t < TRIES && !done && ended[t] ->                       /* a retry */
        t++; started[t] = true; run Attempt(t)
    :: atomic { t < TRIES && !done && !ended[t] && zombies < ZOMBIES -> zombies++ };
        t++; started[t] = true; run Attempt(t)                 /* declared dead, still runs */
    :: done || (t == TRIES) -> break
    od
}

init {
    atomic {
        run Scheduler();
        run Attempt(TRIES + 1)
    }
}

ltl at_most_once { [] (visible_writes <= 1) }
ltl eventually_once { <> done }
