/*
 * decide.h: the native decision engine's tables (built at install by
 * policyc.runtime.native_engine from the Python engine's tables) and its
 * entry points. Same rules as vm_event_abi.h: plain declarations and
 * "#define NAME value" integer constants only, so it is the cffi cdef too.
 *
 * Every table is a flat array owned by Python (cffi) and read-only to C,
 * except the per-rule state (token buckets, disarmed) and the counters.
 * Array sizes are numbers (cffi needs them in the cdef); decide.c asserts
 * they equal the named constants.
 */
#ifndef POLICYC_DECIDE_H
#define POLICYC_DECIDE_H

#include <stddef.h>
#include <stdint.h>
#include "vm_event_abi.h"

/* Decision kinds the native engine decides (index into pe_engine.kind_*). */
#define PE_K_MEM     0
#define PE_K_CR      1
#define PE_K_MSR     2
#define PE_K_BP      3
#define PE_K_CPUID   4
#define PE_K_DESC    5
#define PE_K_GR      6
#define PE_KINDS     7

/* Response slots: (kind, verdict key) -> a lowered response. */
#define PE_R_ALLOW   0
#define PE_R_DENY    1      /* mem_access: deny:read */
#define PE_R_DENY_W  2      /* mem_access: deny:write */
#define PE_R_DENY_X  3      /* mem_access: deny:execute */
#define PE_SLOTS     4

/* Why an event went to the Python engine (pe_engine.punts[reason]). */
#define PE_P_SIZE        0   /* not 400 bytes */
#define PE_P_VERSION     1   /* wrong interface version */
#define PE_P_REASON      2   /* a reason the native engine does not decide */
#define PE_P_RULE        3   /* a candidate rule it cannot express (condition, pause, disarm, ...) */
#define PE_P_RESPONSE    4   /* the response needs a side effect (inject, relax, restore, ...) */
#define PE_P_PAGE_TABLE  5   /* a write to a watched page-table frame (rebinding) */
#define PE_P_NEXT_PAGE   6   /* a data access in a page's last bytes (regions of the next page) */
#define PE_P_NOT_OURS    7   /* a breakpoint that is not ours (re-injection) */
#define PE_P_CR3_VIEW    8   /* a CR3 write that switches views */
#define PE_P_LIMIT       9   /* a rate limit ran out and its `then` needs Python */
#define PE_P_ARCH        10  /* arm64 plans, pending re-arms: the Python engine */
#define PE_PUNTS         11

/* Condition bytecode (one 32-bit word per op; the operand in the high 24 bits). */
#define PE_OP_LIT     1    /* push consts[arg] */
#define PE_OP_FIELD   2    /* push the event field arg */
#define PE_OP_NOT     3
#define PE_OP_NEG     4
#define PE_OP_INV     5
#define PE_OP_ADD     6
#define PE_OP_SUB     7
#define PE_OP_MUL     8
#define PE_OP_DIV     9
#define PE_OP_MOD     10
#define PE_OP_SHL     11
#define PE_OP_SHR     12
#define PE_OP_AND     13
#define PE_OP_OR      14
#define PE_OP_XOR     15
#define PE_OP_EQ      16
#define PE_OP_NE      17
#define PE_OP_LT      18
#define PE_OP_LE      19
#define PE_OP_GT      20
#define PE_OP_GE      21
#define PE_OP_LAND    22
#define PE_OP_LOR     23
#define PE_OP_SET     24   /* (new & ~old) & consts[arg] != 0 */
#define PE_OP_CLEARED 25
#define PE_OP_CHANGED 26
#define PE_MAX_STACK  32
#define PE_MAX_CODE   512

#define PE_MAX_FIELDS 96
/* Field ids the C code reads by name (the loader lays out the others). */
#define PE_F_INSN_LENGTH 13
#define PE_HIST       65

/* An event field: bytes [off, off+size) of the request, >> shift, & mask. */
typedef struct {
    uint16_t off;
    uint8_t size;      /* 0: absent for this kind */
    uint8_t shift;
    uint64_t mask;
} pe_field;

typedef struct {
    uint32_t cond_off, cond_len;     /* bytecode in code[]; len 0: no condition */
    uint32_t name_off, name_len;     /* the rule name, JSON-escaped, in str[] */
    uint32_t msg_off, msg_len;       /* its messages: msg_index[msg_off ..] */
    uint32_t then_msg_off, then_msg_len;
    int32_t feed_off, feed_len;      /* verdict feed bytes in bytes[] (len -1: none) */
    int32_t then_feed_off, then_feed_len;
    double limit;                    /* 0: no limit */
    uint8_t deny;
    uint8_t then_verdict;            /* 0 keep the rule's, 1 allow, 2 deny */
    uint8_t native;                  /* 0: a candidate needs the Python engine */
    uint8_t then_native;             /* 0: an exhausted limit needs the Python engine */
    int32_t priority;
} pe_rule;

typedef struct {                     /* run-time state, shared with the Python engine's rules */
    double tokens, stamp;
    uint8_t has_stamp, disarmed;
} pe_state;

typedef struct {
    uint32_t head_off, head_len;     /* {"kind":..,"severity":..,"rule":..,"message":" */
    uint32_t piece_off, piece_len;   /* pieces[] */
    int32_t priority;
    uint8_t alert;
    uint32_t rule;
} pe_msg;

typedef struct {
    uint32_t lit_off, lit_len;       /* literal text before the field, JSON-escaped */
    int16_t field;                   /* -1: none */
    uint8_t hash, zero, upper, hex;  /* format spec: '#', '0', 'X', x/X */
    uint16_t width;
} pe_piece;

typedef struct {
    uint32_t base_flags;
    int32_t altp2m;                  /* -1: none */
    int32_t p2midx;                  /* -1: none, -2: the faulting view */
    uint8_t read_data;
    uint8_t advance;                 /* 0 none, 1 by advance_by, 2 by insn_length */
    uint8_t native;
    uint64_t advance_by;
} pe_low;

typedef struct {
    int32_t low;                     /* index into lows, -1: none (bare echo) */
    uint32_t name_off, name_len;     /* what the record says: the plan key used */
} pe_slot;

typedef struct {                     /* gfn -> per access kind segment table (open addressing) */
    uint64_t gfn;
    int32_t seg[3];                  /* -1: no rule traps this kind here */
    uint8_t used, trapped, pt;
} pe_page;

typedef struct {
    uint32_t first, count;           /* segments[first .. first+count) */
} pe_segtab;

typedef struct {
    uint16_t start;
    uint32_t claim_off, claim_len;   /* claims[] */
} pe_segment;

typedef struct {
    uint32_t rule, region;
    uint8_t exact;
} pe_claim;

typedef struct {                     /* a u64 key (MSR, breakpoint address, CPUID leaf, ...) -> rules */
    uint64_t key;
    uint32_t list_off, list_len;     /* lists[] */
    int32_t extra;                   /* breakpoints: -1 a site that is not ours */
} pe_keyed;

typedef struct {
    uint64_t decisions, collateral, conservative, unmatched, alerts;
    uint64_t by_kind[7];
    uint64_t allow, deny, would_deny;
    uint64_t hist[65];
    uint64_t lat_count, lat_total, lat_max;
} pe_stats;

typedef struct {                     /* per rule counters (indexed like rules) */
    uint64_t matches, decided, deny, would_deny, limited, alerts, logs;
    uint64_t hist[65];
    uint64_t lat_total, lat_max;
} pe_rule_stats;

typedef struct {                     /* the enforcer's global budget (runtime/budget.py), per event */
    double rate;                     /* tokens a second, and the bucket's size */
    double tokens, stamp;            /* shared with the Python engine's Budget (copied both ways) */
    uint64_t over;                   /* events answered past it */
    uint8_t allow;                   /* past it: answered allow (else by each rule's `then`) */
} pe_budget;

typedef struct {
    /* what the engine is */
    uint8_t audit, enabled;
    uint32_t nrules;
    pe_rule *rules;
    pe_state *state;
    const uint32_t *code;
    uint32_t ncode;
    const uint64_t *consts;
    uint32_t nconsts;
    const char *str;
    uint32_t nstr;
    const uint8_t *bytes;
    uint32_t nbytes;
    const uint32_t *lists;
    uint32_t nlists;
    const pe_msg *msgs;
    const uint32_t *msg_index;
    const pe_piece *pieces;
    /* fields and summaries, per kind */
    pe_field fields[7][96];
    uint32_t summary_off[7], summary_len[7];  /* summary[]: field ids */
    const uint16_t *summary;
    const uint32_t *summary_key_off;      /* per field id: ,"name": in str[] */
    const uint32_t *summary_key_len;
    const uint8_t *summary_hex;           /* per field id */
    uint32_t kind_name_off[7], kind_name_len[7];
    /* responses */
    const pe_low *lows;
    pe_slot slots[7][4];
    uint8_t cpuid_no_response;
    uint32_t flag_name_off[32], flag_name_len[32];      /* "NAME" (quoted) per flag bit */
    /* dispatch */
    const pe_page *pages;
    uint64_t page_mask;                   /* table size - 1 (a power of two) */
    const pe_segtab *segtabs;
    const pe_segment *segments;
    const pe_claim *claims;
    const uint32_t *region_off, *region_len;
    uint32_t cr_list_off[8], cr_list_len[8];
    uint8_t cr3_switch;
    const pe_keyed *msrs; uint32_t nmsrs;
    const pe_keyed *cpuid; uint32_t ncpuid;    /* sorted by leaf */
    uint32_t cpuid_any_off, cpuid_any_len;
    const pe_keyed *desc; uint32_t ndesc;      /* key: descriptor << 1 | is_write */
    const pe_keyed *bps; uint32_t nbps;        /* sorted by address */
    uint32_t gr_off, gr_len;
    /* the record's fixed parts */
    uint32_t id_head_off, id_head_len;         /* {"decision_id":"PREFIX. */
    uint32_t hash_off, hash_len;               /* ","plan_hash":"HASH","kind": (after time) */
    /* counters */
    pe_stats *stats;
    pe_rule_stats *rule_stats;
    uint64_t punts[11];
    pe_budget *budget;                    /* NULL: no global budget */
} pe_engine;

/* The other side's kick after responses are published (Xen's event channel; a producer in tests). */
typedef int (*pe_notify_fn)(void *ctx);
/* Waiting for the other side's next requests (Xen's event channel): 1 woken, 0 timed out, -1 failed
   with errno set (EINTR: a signal, for the caller's loop to see). */
typedef int (*pe_wait_fn)(void *ctx, int timeout_ms);

typedef struct {                      /* one call's inputs and outputs */
    uint64_t now_ns;                  /* wall time of the records */
    double clock;                     /* the rate limits' clock (seconds) */
    uint64_t next_id;                 /* decision ids: the next one to use (advanced) */
    char *log;                        /* NULL: records are not rendered (counted only) */
    size_t log_cap, log_len;          /* log_len advanced */
    size_t record_max;                /* room needed before deciding one more */
    uint32_t *line_end;               /* per decided event: end of its line in log (or NULL) */
    uint8_t *alert;                   /* per decided event: its record has alert messages */
    int32_t punt;                     /* out: why the event after the decided ones was not (-1: none) */
    uint8_t own_clocks;               /* take now_ns and clock from CLOCK_REALTIME / CLOCK_MONOTONIC */
    /* pe_service only */
    struct vm_event_back_ring *back;  /* the ring's monitor side */
    size_t max;                       /* requests taken a call, at most (taken/rsps hold that many) */
    int32_t fd;                       /* where the records go (-1: the caller writes them) */
    uint8_t finish_alerts;            /* records with alerts: the caller finishes the batch */
    uint8_t *taken, *rsps;            /* the requests taken, the responses */
    size_t ntaken, decided;           /* out: of the last batch taken */
    int32_t notify;                   /* out: the other side asked to be notified */
    pe_notify_fn notify_fn;           /* NULL: the caller notifies; else called after each batch */
    void *notify_ctx;
    uint32_t max_batches;             /* batches served in one call, at most (with notify_fn) */
    pe_wait_fn wait_fn;               /* NULL: return when the ring is empty; else wait (with notify_fn) */
    void *wait_ctx;
    uint32_t wait_ms;                 /* the call returns after this long, at most, when events stop */
    size_t served;                    /* out: requests answered whole here, all batches */
    int32_t notify_failed;            /* out: the last kick failed (the caller owes the other side one) */
    int32_t wait_errno;               /* out: the wait failed with this errno (0: it did not) */
    /* the clocks, read as seldom as a record allows (each read a system call where the vDSO cannot
       serve it, as in a Xen PV dom0 whose TSC is unstable) */
    uint64_t mono_ns;                 /* out: CLOCK_MONOTONIC when the last decision was made */
    uint8_t mono_fresh;               /* mono_ns was read after the last wait */
    int64_t wall_offset_ns;           /* CLOCK_REALTIME - CLOCK_MONOTONIC, read at wall_offset_at */
    uint64_t wall_offset_at;          /* (0: never) */
    uint8_t clock_source;             /* PE_CLOCK_*: 0 chooses at the first read */
    uint64_t anchor_cycles, anchor_ns, last_ns;  /* PE_CLOCK_CYCLES: a reading of both clocks, the last time given */
    double ns_per_cycle;
} pe_call;

/* Where the engine's monotonic time comes from. The system clock unless reading it is a system call
   (no vDSO for it: a Xen PV dom0 whose TSC Linux calls unstable); then the CPU's cycle counter
   (x86 TSC, native in a PV dom0; arm64's virtual counter), scaled by the system clock re-read once
   a second. */
#define PE_CLOCK_AUTO   0
#define PE_CLOCK_SYSTEM 1
#define PE_CLOCK_CYCLES 2

/* Batches on the monitor's side of a ring: see decide.c. */
#define PE_SERVED    1      /* taken, decided, recorded and answered */
#define PE_UNFINISHED 0     /* taken; the caller finishes (handed-over events, alerts, a log it writes) */
#define PE_LOG_FAILED (-1)  /* decided, but the records could not be written; nothing answered */
int pe_service(pe_engine *e, pe_call *c);
int pe_verify_code(const pe_engine *e, uint32_t kind, uint32_t off, uint32_t len);
size_t pe_decide(pe_engine *e, pe_call *c, const uint8_t *reqs, size_t n, uint8_t *rsps);

#endif
