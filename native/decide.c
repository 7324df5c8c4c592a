/*
 * decide.c: the native decision engine, a second implementation of
 * runtime/decide.py for the events it can express.
 *
 * pe_decide answers requests in order until one needs the Python engine
 * (its reason is counted in punts[] and returned in pe_call.punt); for each
 * one it decides it writes the response and, unless the caller only counts,
 * the decision record: the same JSON line runtime/decision_log.py writes for
 * the Python engine's decision. Nothing is mutated for an event it hands
 * over: rule state (token buckets) is committed only once the whole decision,
 * response included, is known to be expressible here.
 *
 * The tables are built and checked by policyc.runtime.native_engine;
 * conditions are verified by pe_verify_code before the engine is enabled
 * (bounded, no jumps, every field one the event kind has, the stack never
 * under- or overflows), so evaluation needs no checks.
 */
#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vm_event_abi.h"
#include "decide.h"

#define EVENT 400
#define OFF_U 24
#define OFF_DATA 56
#define OFF_RIP (OFF_DATA + 19 * 8)
#define OFF_REGS_PAD (OFF_DATA + 344 - 2)
#define PAGE 4096
#define DATA_SLACK 7
#define MAXC 256      /* candidate rules / messages per event the native engine takes */

static const char NOTE_ASYNC[] = "asynchronous event: Xen ignores response flags, nothing enforced";
static const char NOTE_COLLATERAL[] = "collateral: no rule's region claims this access";
static const char NOTE_UNTRAPPED[] = "no rule traps this frame";

static inline uint64_t rd(const uint8_t *p, unsigned size)
{
    uint64_t v = 0;
    memcpy(&v, p, size);      /* little-endian host, as the ABI */
    return v;
}

static inline uint64_t field(const pe_engine *e, uint32_t kind, const uint8_t *raw, uint32_t id)
{
    const pe_field *f = &e->fields[kind][id];
    return (rd(raw + f->off, f->size) >> f->shift) & f->mask;
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- clocks ------------------------------------------------------------- */

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#define HAVE_CYCLES 1
static inline uint64_t cycles(void) { return __rdtsc(); }
#elif defined(__aarch64__)
#define HAVE_CYCLES 1
static inline uint64_t cycles(void)
{
    uint64_t v;
    __asm__ volatile("isb; mrs %0, cntvct_el0" : "=r"(v));
    return v;
}
#else
#define HAVE_CYCLES 0
static inline uint64_t cycles(void) { return 0; }
#endif

#define ANCHOR_NS 1000000000u         /* the cycle counter is re-scaled against the clock this often */

/* The system clock is "slow" when 16 reads of it cost over 8 times 16 reads of the coarse clock,
 * which the vDSO always serves (best of three, so an interrupt does not decide). */
static int system_clock_is_slow(void)
{
    uint64_t best_fine = ~0ull, best_coarse = ~0ull, y0, y1, y2;
    struct timespec ts;
    int round, i;

    for (round = 0; round < 3; round++) {
        y0 = cycles();
        for (i = 0; i < 16; i++)
            clock_gettime(CLOCK_MONOTONIC, &ts);
        y1 = cycles();
        for (i = 0; i < 16; i++)
            clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
        y2 = cycles();
        if (y1 - y0 < best_fine)
            best_fine = y1 - y0;
        if (y2 - y1 < best_coarse)
            best_coarse = y2 - y1;
    }
    return best_fine > 8 * best_coarse;
}

/* Read both clocks: the counter on either side of the clock's read, taking the midpoint (in a PV
 * dom0 the read is a system call, long next to a counter's tick). From the second reading on, the
 * scale is the counter's rate between the two: taken unless implausible (under a tenth or over ten
 * times the last, as when the thread moved to a CPU whose counter is offset). */
static void anchor(pe_call *c)
{
    uint64_t y0 = cycles(), ns = mono_ns(), y1 = cycles(), y = y0 + (y1 - y0) / 2;

    if (c->anchor_ns && y > c->anchor_cycles && ns > c->anchor_ns) {
        double rate = (double)(ns - c->anchor_ns) / (double)(y - c->anchor_cycles);
        if (c->ns_per_cycle <= 0 || (rate > c->ns_per_cycle * 0.1 && rate < c->ns_per_cycle * 10))
            c->ns_per_cycle = rate;
    }
    c->anchor_ns = ns;
    c->anchor_cycles = y;
}

/* CLOCK_MONOTONIC's time in ns, from the source the call chose; never earlier than the last. */
static uint64_t now_ns(pe_call *c)
{
    uint64_t t, y, elapsed;

    if (c->clock_source == PE_CLOCK_AUTO)
        c->clock_source = HAVE_CYCLES && system_clock_is_slow() ? PE_CLOCK_CYCLES : PE_CLOCK_SYSTEM;
    if (c->clock_source != PE_CLOCK_CYCLES || !HAVE_CYCLES)
        return mono_ns();
    if (c->ns_per_cycle <= 0) {     /* the first scale over 20 ms (chosen or forced), then each second's */
        anchor(c);
        do
            t = mono_ns();
        while (t - c->anchor_ns < 20000000u);
        anchor(c);
    }
    y = cycles();
    elapsed = y > c->anchor_cycles ? (uint64_t)((double)(y - c->anchor_cycles) * c->ns_per_cycle) : 0;
    if (y < c->anchor_cycles || elapsed >= ANCHOR_NS || c->ns_per_cycle <= 0) {
        anchor(c);
        t = c->anchor_ns;
    } else {
        t = c->anchor_ns + elapsed;
    }
    if (t < c->last_ns)
        t = c->last_ns;
    c->last_ns = t;
    return t;
}

/* Wall time from the monotonic clock and an offset re-read once a second: a record's time is then
 * one clock read, not two, and a step of the wall clock shows within a second. */
#define WALL_OFFSET_REFRESH_NS 1000000000u

static uint64_t wall_ns(pe_call *c, uint64_t mono)
{
    if (!c->wall_offset_at || mono - c->wall_offset_at >= WALL_OFFSET_REFRESH_NS) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        c->wall_offset_ns = (int64_t)((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec) - (int64_t)mono;
        c->wall_offset_at = mono;
    }
    return (uint64_t)((int64_t)mono + c->wall_offset_ns);
}

/* ---- conditions --------------------------------------------------------- */

int pe_verify_code(const pe_engine *e, uint32_t kind, uint32_t off, uint32_t len)
{
    uint32_t i, depth = 0;

    if (kind >= PE_KINDS || len == 0 || len > PE_MAX_CODE || off > e->ncode || len > e->ncode - off)
        return 0;
    for (i = 0; i < len; i++) {
        uint32_t w = e->code[off + i], op = w & 0xff, arg = w >> 8;
        switch (op) {
        case PE_OP_LIT:
            if (arg >= e->nconsts || ++depth > PE_MAX_STACK)
                return 0;
            break;
        case PE_OP_FIELD:
            if (arg >= PE_MAX_FIELDS || e->fields[kind][arg].size == 0 ||
                e->fields[kind][arg].size > 8 ||
                e->fields[kind][arg].off + e->fields[kind][arg].size > EVENT || ++depth > PE_MAX_STACK)
                return 0;
            break;
        case PE_OP_SET: case PE_OP_CLEARED: case PE_OP_CHANGED:
            if (arg >= e->nconsts || (kind != PE_K_CR && kind != PE_K_MSR) || ++depth > PE_MAX_STACK)
                return 0;
            break;
        case PE_OP_NOT: case PE_OP_NEG: case PE_OP_INV:
            if (depth < 1)
                return 0;
            break;
        default:
            if (op < PE_OP_ADD || op > PE_OP_LOR || depth < 2)
                return 0;
            depth--;
        }
    }
    return depth == 1;
}

/* Register writes keep old and new in the same place for every kind that has them. */
static uint64_t run(const pe_engine *e, uint32_t kind, const uint8_t *raw, const pe_rule *r)
{
    uint64_t st[PE_MAX_STACK];
    int sp = -1;
    const uint32_t *code = e->code + r->cond_off;
    uint32_t i;

    for (i = 0; i < r->cond_len; i++) {
        uint32_t op = code[i] & 0xff, arg = code[i] >> 8;
        uint64_t a, b;
        if (op == PE_OP_LIT) { st[++sp] = e->consts[arg]; continue; }
        if (op == PE_OP_FIELD) { st[++sp] = field(e, kind, raw, arg); continue; }
        if (op >= PE_OP_SET) {
            uint64_t mask = e->consts[arg];
            uint64_t nv = rd(raw + OFF_U + 8, 8) & mask, ov = rd(raw + OFF_U + 16, 8) & mask;
            st[++sp] = op == PE_OP_SET ? (nv & ~ov) != 0 : op == PE_OP_CLEARED ? (ov & ~nv) != 0 : ov != nv;
            continue;
        }
        if (op == PE_OP_NOT) { st[sp] = !st[sp]; continue; }
        if (op == PE_OP_NEG) { st[sp] = (uint64_t)0 - st[sp]; continue; }
        if (op == PE_OP_INV) { st[sp] = ~st[sp]; continue; }
        b = st[sp--];
        a = st[sp];
        switch (op) {
        case PE_OP_ADD: a = a + b; break;
        case PE_OP_SUB: a = a - b; break;
        case PE_OP_MUL: a = a * b; break;
        case PE_OP_DIV: a = b ? a / b : 0; break;
        case PE_OP_MOD: a = b ? a % b : 0; break;
        case PE_OP_SHL: a = b < 64 ? a << b : 0; break;
        case PE_OP_SHR: a = b < 64 ? a >> b : 0; break;
        case PE_OP_AND: a = a & b; break;
        case PE_OP_OR: a = a | b; break;
        case PE_OP_XOR: a = a ^ b; break;
        case PE_OP_EQ: a = a == b; break;
        case PE_OP_NE: a = a != b; break;
        case PE_OP_LT: a = a < b; break;
        case PE_OP_LE: a = a <= b; break;
        case PE_OP_GT: a = a > b; break;
        case PE_OP_GE: a = a >= b; break;
        case PE_OP_LAND: a = a && b; break;
        default: a = a || b; break;   /* PE_OP_LOR (verified) */
        }
        st[sp] = a;
    }
    return st[0];
}

/* ---- responses ------------------------------------------------------------ */

/* decide.py pack_response: header, paused flag and u echoed, plus flags and data. */
static void pack(const uint8_t *raw, uint8_t *out, uint32_t flags, int32_t alt, int32_t p2midx,
                 const uint8_t *read, int32_t read_len, int set_rip, uint64_t rip)
{
    uint32_t req_flags = (uint32_t)rd(raw + 4, 4);
    uint32_t out_flags = (req_flags & VM_EVENT_FLAG_VCPU_PAUSED) | flags;
    uint16_t idx = 0;

    memset(out, 0, EVENT);
    if (alt >= 0) {
        out_flags |= VM_EVENT_FLAG_ALTERNATE_P2M;
        idx = (uint16_t)alt;
    }
    memcpy(out + OFF_U, raw + OFF_U, OFF_DATA - OFF_U);
    if (p2midx >= 0) {
        uint16_t p = (uint16_t)p2midx;
        out_flags |= VM_EVENT_FLAG_FAST_SINGLESTEP;
        memcpy(out + OFF_U, &p, 2);
    }
    if (read_len >= 0) {
        uint32_t len = (uint32_t)read_len;
        out_flags |= VM_EVENT_FLAG_EMULATE | VM_EVENT_FLAG_SET_EMUL_READ_DATA;
        memcpy(out + OFF_DATA, &len, 4);
        memcpy(out + OFF_DATA + 4, read, len);
    } else if (set_rip) {
        out_flags |= VM_EVENT_FLAG_SET_REGISTERS;
        memcpy(out + OFF_DATA, raw + OFF_DATA, OFF_REGS_PAD - OFF_DATA);
        memcpy(out + OFF_RIP, &rip, 8);
    }
    memcpy(out, raw, 4);                 /* version */
    memcpy(out + 4, &out_flags, 4);
    memcpy(out + 8, raw + 8, 8);         /* reason, vcpu_id */
    memcpy(out + 16, &idx, 2);
}

static void echo(const uint8_t *raw, uint8_t *out)
{
    pack(raw, out, 0, -1, -1, NULL, -1, 0, 0);
}

/* ---- records ------------------------------------------------------------- */

typedef struct {
    char *p;
    size_t n;
} wbuf;

static inline void put(wbuf *w, const char *s, size_t len)
{
    memcpy(w->p + w->n, s, len);
    w->n += len;
}

#define PUTS(w, lit) put((w), (lit), sizeof(lit) - 1)

static inline void put_pool(wbuf *w, const pe_engine *e, uint32_t off, uint32_t len)
{
    put(w, e->str + off, len);
}

static void put_u64(wbuf *w, uint64_t v, int base, int upper, int min_digits)
{
    char tmp[24];
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    int n = 0;
    do {
        tmp[n++] = digits[v % (uint64_t)base];
        v /= (uint64_t)base;
    } while (v);
    while (n < min_digits)
        tmp[n++] = '0';
    while (n)
        w->p[w->n++] = tmp[--n];
}

static void put_hex_str(wbuf *w, uint64_t v)        /* "0x.." as Python's hex() */
{
    PUTS(w, "\"0x");
    put_u64(w, v, 16, 0, 1);
    PUTS(w, "\"");
}

/* format(value, spec) for the specs the loader accepts: [#][0][width][xXd]. */
static void put_formatted(wbuf *w, uint64_t v, const pe_piece *pc)
{
    char tmp[96];
    wbuf t = {tmp, 0};
    int base = pc->hex ? 16 : 10;
    size_t prefix = (pc->hash && pc->hex) ? 2 : 0, digits, pad, i;

    put_u64(&t, v, base, pc->upper, 1);
    digits = t.n;
    pad = pc->width > digits + prefix ? pc->width - digits - prefix : 0;
    if (!pc->zero)
        for (i = 0; i < pad; i++)
            w->p[w->n++] = ' ';
    if (prefix) {
        w->p[w->n++] = '0';
        w->p[w->n++] = pc->upper ? 'X' : 'x';
    }
    if (pc->zero)
        for (i = 0; i < pad; i++)
            w->p[w->n++] = '0';
    put(w, tmp, digits);
}

static void put_time(wbuf *w, uint64_t ns)
{
    time_t sec = (time_t)(ns / 1000000000u);
    struct tm tm;
    gmtime_r(&sec, &tm);
    put_u64(w, (uint64_t)tm.tm_year + 1900, 10, 0, 4);
    PUTS(w, "-");
    put_u64(w, (uint64_t)tm.tm_mon + 1, 10, 0, 2);
    PUTS(w, "-");
    put_u64(w, (uint64_t)tm.tm_mday, 10, 0, 2);
    PUTS(w, "T");
    put_u64(w, (uint64_t)tm.tm_hour, 10, 0, 2);
    PUTS(w, ":");
    put_u64(w, (uint64_t)tm.tm_min, 10, 0, 2);
    PUTS(w, ":");
    put_u64(w, (uint64_t)tm.tm_sec, 10, 0, 2);
    PUTS(w, ".");
    put_u64(w, (ns / 1000u) % 1000000u, 10, 0, 6);
    PUTS(w, "Z");
}

/* ---- one decision ---------------------------------------------------------- */

typedef struct {
    uint32_t kind, vcpu, flags, nmatched, nmsgs, nlimited, nregions;
    int paused, collateral, conservative, would_deny, deny, winner;
    int over;                         /* past the global budget: every rule as past its limit */
    const char *note;
    size_t note_len;
    uint32_t resp_off, resp_len;
    uint32_t matched[MAXC], msgs[MAXC], limited[MAXC], regions[MAXC];   /* not cleared: counted */
} decision;

static int hist_bucket(uint64_t ns)
{
    return ns ? 64 - __builtin_clzll(ns) : 0;
}

static void count(pe_engine *e, const decision *d, uint64_t latency)
{
    pe_stats *s = e->stats;
    uint32_t i;
    int b = hist_bucket(latency);

    s->decisions++;
    s->by_kind[d->kind]++;
    if (d->would_deny)
        s->would_deny++;
    else if (d->deny)
        s->deny++;
    else
        s->allow++;
    s->collateral += d->collateral != 0;
    s->conservative += d->conservative != 0;
    s->unmatched += !d->nmatched && !d->collateral;
    s->hist[b]++;
    s->lat_count++;
    s->lat_total += latency;
    if (latency > s->lat_max)
        s->lat_max = latency;
    for (i = 0; i < d->nmatched; i++) {
        pe_rule_stats *rs = &e->rule_stats[d->matched[i]];
        rs->matches++;
        rs->hist[b]++;
        rs->lat_total += latency;
        if (latency > rs->lat_max)
            rs->lat_max = latency;
    }
    if (d->winner >= 0) {
        pe_rule_stats *rs = &e->rule_stats[d->winner];
        rs->decided++;
        if (d->would_deny)
            rs->would_deny++;
        else if (d->deny)
            rs->deny++;
    }
    for (i = 0; i < d->nlimited; i++)
        e->rule_stats[d->limited[i]].limited++;
    for (i = 0; i < d->nmsgs; i++) {
        const pe_msg *m = &e->msgs[d->msgs[i]];
        if (m->alert) {
            e->rule_stats[m->rule].alerts++;
            s->alerts++;
        } else {
            e->rule_stats[m->rule].logs++;
        }
    }
}

static void put_rule_list(wbuf *w, const pe_engine *e, const uint32_t *rules, uint32_t n)
{
    uint32_t i;
    PUTS(w, "[");
    for (i = 0; i < n; i++) {
        if (i)
            PUTS(w, ",");
        put_pool(w, e, e->rules[rules[i]].name_off, e->rules[rules[i]].name_len);
    }
    PUTS(w, "]");
}

/* The record decision_log.DecisionLog.record writes, key for key. */
static void record(const pe_engine *e, pe_call *c, const decision *d, const uint8_t *raw,
                   uint32_t rsp_flags, uint64_t latency, int *has_alert, const wbuf *time_text)
{
    wbuf w = {c->log + c->log_len, 0};
    uint32_t i, k = d->kind, bit;
    int first;

    put_pool(&w, e, e->id_head_off, e->id_head_len);
    put_u64(&w, c->next_id, 10, 0, 1);
    PUTS(&w, "\",\"time\":\"");
    put(&w, time_text->p, time_text->n);
    put_pool(&w, e, e->hash_off, e->hash_len);
    put_pool(&w, e, e->kind_name_off[k], e->kind_name_len[k]);
    PUTS(&w, ",\"vcpu\":");
    put_u64(&w, d->vcpu, 10, 0, 1);
    PUTS(&w, ",\"rule\":");
    if (d->winner >= 0)
        put_pool(&w, e, e->rules[d->winner].name_off, e->rules[d->winner].name_len);
    else
        PUTS(&w, "null");
    PUTS(&w, ",\"rules\":");
    put_rule_list(&w, e, d->matched, d->nmatched);
    if (d->deny)
        PUTS(&w, ",\"verdict\":\"deny\",\"would_deny\":");
    else
        PUTS(&w, ",\"verdict\":\"allow\",\"would_deny\":");
    if (d->would_deny)
        PUTS(&w, "true,\"response\":");
    else
        PUTS(&w, "false,\"response\":");
    put_pool(&w, e, d->resp_off, d->resp_len);
    PUTS(&w, ",\"response_flags\":[");
    first = 1;
    for (bit = 0; bit < 32; bit++) {
        if (!(rsp_flags & (1u << bit)) || !e->flag_name_len[bit])
            continue;
        if (!first)
            PUTS(&w, ",");
        first = 0;
        put_pool(&w, e, e->flag_name_off[bit], e->flag_name_len[bit]);
    }
    if (d->collateral)
        PUTS(&w, "],\"collateral\":true,\"event\":{");
    else
        PUTS(&w, "],\"collateral\":false,\"event\":{");
    for (i = 0; i < e->summary_len[k]; i++) {
        uint32_t id = e->summary[e->summary_off[k] + i];
        if (i)
            PUTS(&w, ",");
        put_pool(&w, e, e->summary_key_off[id], e->summary_key_len[id]);
        if (e->summary_hex[id])
            put_hex_str(&w, field(e, k, raw, id));
        else
            put_u64(&w, field(e, k, raw, id), 10, 0, 1);
    }
    PUTS(&w, "},\"latency_ns\":");
    put_u64(&w, latency, 10, 0, 1);
    if (d->conservative)
        PUTS(&w, ",\"conservative\":true");
    if (d->nregions) {
        PUTS(&w, ",\"regions\":[");
        for (i = 0; i < d->nregions; i++) {
            if (i)
                PUTS(&w, ",");
            put_pool(&w, e, e->region_off[d->regions[i]], e->region_len[d->regions[i]]);
        }
        PUTS(&w, "]");
    }
    if (!d->paused)
        PUTS(&w, ",\"async\":true");
    if (d->nmsgs) {
        PUTS(&w, ",\"messages\":[");
        for (i = 0; i < d->nmsgs; i++) {
            const pe_msg *m = &e->msgs[d->msgs[i]];
            uint32_t p;
            if (i)
                PUTS(&w, ",");
            *has_alert |= m->alert;
            put_pool(&w, e, m->head_off, m->head_len);
            for (p = 0; p < m->piece_len; p++) {
                const pe_piece *pc = &e->pieces[m->piece_off + p];
                put_pool(&w, e, pc->lit_off, pc->lit_len);
                if (pc->field >= 0)
                    put_formatted(&w, field(e, k, raw, (uint32_t)pc->field), pc);
            }
            PUTS(&w, "\"}");
        }
        PUTS(&w, "]");
    }
    if (d->nlimited) {
        PUTS(&w, ",\"limited\":");
        put_rule_list(&w, e, d->limited, d->nlimited);
    }
    if (d->note) {
        PUTS(&w, ",\"note\":\"");
        put(&w, d->note, d->note_len);
        PUTS(&w, "\"");
    }
    PUTS(&w, "}\n");
    c->log_len += w.n;
}

static const pe_keyed *find_key(const pe_keyed *t, uint32_t n, uint64_t key)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (t[mid].key < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && t[lo].key == key ? &t[lo] : NULL;
}

static const pe_page *find_page(const pe_engine *e, uint64_t gfn)
{
    uint64_t i;
    if (!e->pages)
        return NULL;
    for (i = (gfn * 0x9E3779B97F4A7C15ull) >> 20 & e->page_mask;; i = (i + 1) & e->page_mask) {
        const pe_page *p = &e->pages[i];
        if (!p->used)
            return NULL;
        if (p->gfn == gfn)
            return p;
    }
}

_Static_assert(sizeof(((pe_engine *)0)->fields) == sizeof(pe_field) * PE_KINDS * PE_MAX_FIELDS, "fields");
_Static_assert(sizeof(((pe_engine *)0)->slots) == sizeof(pe_slot) * PE_KINDS * PE_SLOTS, "slots");
_Static_assert(sizeof(((pe_engine *)0)->punts) == sizeof(uint64_t) * PE_PUNTS, "punts");
_Static_assert(sizeof(((pe_stats *)0)->hist) == sizeof(uint64_t) * PE_HIST, "hist");
_Static_assert(sizeof(((pe_stats *)0)->by_kind) == sizeof(uint64_t) * PE_KINDS, "by_kind");

#define NOTE(d, s) ((d)->note = (s), (d)->note_len = sizeof(s) - 1)

typedef struct {                      /* the rules an event may match, before conditions */
    uint32_t n, rule[MAXC], claim_of[MAXC];
    const pe_claim *claims;           /* memory: the segment's claims (claim_of indexes them) */
    uint32_t deny_slot;               /* the response slot of a deny */
} candidates;

/* Memory: the claims of the segment the access starts in, one per rule (the exact one if any;
 * a segment's claims are in rule order). */
static int mem_candidates(const pe_engine *e, const uint8_t *raw, decision *d, candidates *cs)
{
    uint64_t gfn = rd(raw + OFF_U, 8), offset = rd(raw + OFF_U + 8, 8);
    uint32_t mflags = (uint32_t)rd(raw + OFF_U + 24, 4), k, j;
    const pe_page *page = find_page(e, gfn);
    int32_t seg = -1;

    k = (mflags & MEM_ACCESS_W) ? 1 : (mflags & MEM_ACCESS_X) ? 2 : 0;
    cs->deny_slot = k == 0 ? PE_R_DENY : k == 1 ? PE_R_DENY_W : PE_R_DENY_X;
    if (page && page->pt)
        return PE_P_PAGE_TABLE;
    if (k != 2 && offset > PAGE - 1 - DATA_SLACK && (mflags & MEM_ACCESS_GLA_VALID))
        return PE_P_NEXT_PAGE;
    if (page)
        seg = page->seg[k];
    if (seg >= 0) {
        const pe_segtab *t = &e->segtabs[seg];
        uint32_t lo = 0, hi = t->count;
        const pe_segment *s;
        while (hi - lo > 1) {       /* the last segment starting at or before offset */
            uint32_t mid = lo + (hi - lo) / 2;
            if (e->segments[t->first + mid].start <= offset)
                lo = mid;
            else
                hi = mid;
        }
        s = &e->segments[t->first + lo];
        cs->claims = e->claims + s->claim_off;
        for (j = 0; j < s->claim_len; j++) {
            const pe_claim *cl = &cs->claims[j];
            if (cs->n && cs->claims[cs->claim_of[cs->n - 1]].rule == cl->rule) {
                if (cl->exact && !cs->claims[cs->claim_of[cs->n - 1]].exact)
                    cs->claim_of[cs->n - 1] = j;
                continue;
            }
            if (cs->n == MAXC)
                return PE_P_RULE;
            cs->claim_of[cs->n] = j;
            cs->rule[cs->n++] = cl->rule;
        }
    }
    if (!cs->n) {
        d->collateral = 1;
        if (page && page->trapped)
            NOTE(d, NOTE_COLLATERAL);
        else
            NOTE(d, NOTE_UNTRAPPED);
    }
    return -1;
}

/* The candidate rules for the event's kind (-1), or why the Python engine must decide it. */
static int select_candidates(const pe_engine *e, const uint8_t *raw, decision *d, candidates *cs)
{
    const pe_keyed *f = NULL;
    const uint32_t *list = NULL;
    uint32_t list_len = 0, j;

    cs->deny_slot = PE_R_DENY;
    switch ((uint32_t)rd(raw + 8, 4)) {
    case VM_EVENT_REASON_MEM_ACCESS:
        d->kind = PE_K_MEM;
        return mem_candidates(e, raw, d, cs);
    case VM_EVENT_REASON_WRITE_CTRLREG: {
        uint32_t index = (uint32_t)rd(raw + OFF_U, 4);
        d->kind = PE_K_CR;
        if (e->cr3_switch && index == VM_EVENT_X86_CR3)
            return PE_P_CR3_VIEW;
        if (index < 8) {
            list = e->lists + e->cr_list_off[index];
            list_len = e->cr_list_len[index];
        }
        break;
    }
    case VM_EVENT_REASON_MOV_TO_MSR:
        d->kind = PE_K_MSR;
        f = find_key(e->msrs, e->nmsrs, rd(raw + OFF_U, 8));
        break;
    case VM_EVENT_REASON_SOFTWARE_BREAKPOINT: {
        uint64_t rip = rd(raw + OFF_RIP, 8), gfn = rd(raw + OFF_U, 8);
        d->kind = PE_K_BP;
        f = find_key(e->bps, e->nbps, rip);
        /* by frame too: a frame number of 52 bits or more is no frame (shifted, it would wrap onto
           one of ours; the Python engine's unbounded integers never match there) */
        if (!f && gfn != ~(uint64_t)0 && !(gfn >> 52))
            f = find_key(e->bps, e->nbps, (gfn << 12) | (rip & 0xfff));
        if (!f || f->extra < 0)
            return PE_P_NOT_OURS;
        break;
    }
    case VM_EVENT_REASON_CPUID:
        d->kind = PE_K_CPUID;
        f = find_key(e->cpuid, e->ncpuid, rd(raw + OFF_U + 4, 4));
        if (!f) {
            list = e->lists + e->cpuid_any_off;
            list_len = e->cpuid_any_len;
        }
        break;
    case VM_EVENT_REASON_DESCRIPTOR_ACCESS:
        d->kind = PE_K_DESC;
        f = find_key(e->desc, e->ndesc, rd(raw + OFF_U + 16, 1) << 1 | (rd(raw + OFF_U + 17, 1) ? 1 : 0));
        break;
    case VM_EVENT_REASON_GUEST_REQUEST:
        d->kind = PE_K_GR;
        list = e->lists + e->gr_off;
        list_len = e->gr_len;
        break;
    default:
        return PE_P_REASON;
    }
    if (f) {
        list = e->lists + f->list_off;
        list_len = f->list_len;
    }
    if (list_len > MAXC)
        return PE_P_RULE;
    for (j = 0; j < list_len; j++)
        cs->rule[cs->n++] = list[j];
    return -1;
}

/* Every live candidate must be one this engine runs; the matches are kept in plan order. */
static int match(const pe_engine *e, const uint8_t *raw, decision *d, const candidates *cs)
{
    uint32_t j;

    for (j = 0; j < cs->n; j++)
        if (!e->state[cs->rule[j]].disarmed && !e->rules[cs->rule[j]].native)
            return PE_P_RULE;
    for (j = 0; j < cs->n; j++) {
        const pe_rule *r = &e->rules[cs->rule[j]];
        if (e->state[cs->rule[j]].disarmed)
            continue;
        if (r->cond_len && !run(e, d->kind, raw, r))
            continue;
        if (d->kind == PE_K_MEM) {
            const pe_claim *cl = &cs->claims[cs->claim_of[j]];
            uint32_t q;
            for (q = 0; q < d->nregions && d->regions[q] != cl->region; q++)
                ;
            if (q == d->nregions)
                d->regions[d->nregions++] = cl->region;
            if (cl->exact)
                d->conservative = -1;       /* an exact claim: not conservative */
        }
        d->matched[d->nmatched++] = cs->rule[j];
    }
    d->conservative = d->kind == PE_K_MEM && d->nmatched && d->conservative == 0;
    return -1;
}

typedef struct {                      /* rate-limit tokens taken, committed once the decision stands */
    double tokens[MAXC];
    uint8_t took[MAXC];
    int32_t feed_off, feed_len;       /* the winning deny's feed */
} verdict_state;

/* Every matched rule's actions; the strongest verdict wins (decide.py _verdict). */
static int decide_verdict(const pe_engine *e, const pe_call *c, decision *d, verdict_state *v)
{
    uint32_t j, m;

    v->feed_off = v->feed_len = -1;
    for (j = 0; j < d->nmatched; j++) {
        const pe_rule *r = &e->rules[d->matched[j]];
        const pe_state *st = &e->state[d->matched[j]];
        int deny = r->deny, ok = 1;
        uint32_t moff = r->msg_off, mlen = r->msg_len;
        int32_t foff = r->feed_off, flen = r->feed_len;
        v->took[j] = 0;
        if (d->over) {
            ok = 0;                     /* decide.py: the global budget, before the rule's own limit */
        } else if (r->limit > 0) {
            double t = st->tokens;
            if (st->has_stamp) {
                double refill = t + (c->clock - st->stamp) * r->limit;
                t = refill < r->limit ? refill : r->limit;
            }
            ok = t >= 1.0;
            v->tokens[j] = ok ? t - 1.0 : t;
            v->took[j] = 1;
        }
        if (!ok) {
            if (!r->then_native)
                return PE_P_LIMIT;
            d->limited[d->nlimited++] = d->matched[j];
            moff = r->then_msg_off;
            mlen = r->then_msg_len;
            if (r->then_verdict) {
                deny = r->then_verdict == 2;
                foff = r->then_feed_off;
                flen = r->then_feed_len;
            }
        }
        for (m = 0; m < mlen; m++) {
            if (d->nmsgs == MAXC)
                return PE_P_RULE;
            d->msgs[d->nmsgs++] = e->msg_index[moff + m];
        }
        if (deny && !d->deny) {
            d->deny = 1;
            d->winner = (int)d->matched[j];
            v->feed_off = foff;
            v->feed_len = flen;
        } else if (d->winner < 0) {
            d->winner = (int)d->matched[j];
        }
    }
    return -1;
}

/* The response, by the plan's strategy for the kind (audit: allow), packed into out. */
static int respond(const pe_engine *e, const uint8_t *raw, uint8_t *out, decision *d, const candidates *cs,
                   const verdict_state *v)
{
    const pe_slot *s;
    const pe_low *low;
    uint64_t step = 0;
    int audit;

    if (d->kind == PE_K_CPUID && e->cpuid_no_response) {
        /* Not in the plan, yet it arrived: CPUID has run but rip has not moved (livelock otherwise). */
        d->resp_off = e->slots[PE_K_CPUID][PE_R_ALLOW].name_off;
        d->resp_len = e->slots[PE_K_CPUID][PE_R_ALLOW].name_len;
        if (d->paused)
            pack(raw, out, 0, -1, -1, NULL, -1, 1, rd(raw + OFF_RIP, 8) + rd(raw + OFF_U, 4));
        else
            echo(raw, out);
        return -1;
    }
    audit = e->audit || (d->over && e->budget->allow);
    if (d->deny && audit)
        d->would_deny = 1;
    s = &e->slots[d->kind][d->deny && !audit ? cs->deny_slot : PE_R_ALLOW];
    d->resp_off = s->name_off;
    d->resp_len = s->name_len;
    if (!d->paused) {
        if (!d->note)
            NOTE(d, NOTE_ASYNC);
        echo(raw, out);
        return -1;
    }
    if (s->low < 0) {
        echo(raw, out);
        return -1;
    }
    low = &e->lows[s->low];
    if (!low->native)
        return PE_P_RESPONSE;
    if (low->advance)
        step = low->advance == 1 ? low->advance_by :
               e->fields[d->kind][PE_F_INSN_LENGTH].size ? field(e, d->kind, raw, PE_F_INSN_LENGTH) : 0;
    pack(raw, out, low->base_flags, low->altp2m,
         low->p2midx == -2 ? (int32_t)rd(raw + 16, 2) : low->p2midx,
         low->read_data ? (v->feed_len >= 0 ? e->bytes + v->feed_off : (const uint8_t *)"\0\0\0\0\0\0\0\0") : NULL,
         low->read_data ? (v->feed_len >= 0 ? v->feed_len : 8) : -1,
         low->advance != 0, rd(raw + OFF_RIP, 8) + step);
    return -1;
}

/* Stable, by priority, highest first (decide.py sorts the messages so). */
static void sort_messages(const pe_engine *e, decision *d)
{
    uint32_t a, b;
    for (a = 1; a < d->nmsgs; a++) {
        uint32_t x = d->msgs[a];
        for (b = a; b > 0 && e->msgs[d->msgs[b - 1]].priority < e->msgs[x].priority; b--)
            d->msgs[b] = d->msgs[b - 1];
        d->msgs[b] = x;
    }
}

/* The global budget's bucket at c->clock, as runtime/budget.py's Budget.take(1): refilled, then
 * one token if a whole one is there. Computed into *tokens / *stamp, committed once decided. */
static int over_budget(const pe_budget *b, const pe_call *c, double *tokens, double *stamp)
{
    double t = b->tokens, refill;

    *stamp = b->stamp;
    if (c->clock > b->stamp) {
        refill = t + (c->clock - b->stamp) * b->rate;
        t = refill < b->rate ? refill : b->rate;
        *stamp = c->clock;
    }
    *tokens = t >= 1.0 ? t - 1.0 : t;
    return t < 1.0;
}

/* Returns -1 when decided (response and record written), else a PE_P_* reason; nothing is
 * changed for an event handed over. */
static int decide_one(pe_engine *e, pe_call *c, const uint8_t *raw, uint8_t *out, size_t i,
                      const wbuf *time_text)
{
    uint64_t t0 = c->mono_ns, latency;   /* the batch's start, or the decision before this one's end */
    decision d;
    candidates cs;
    verdict_state v;
    uint32_t j;
    int why, has_alert = 0;
    double budget_tokens = 0.0, budget_stamp = 0.0;

    if (!e->enabled)
        return PE_P_ARCH;
    if (rd(raw, 4) != VM_EVENT_INTERFACE_VERSION)
        return PE_P_VERSION;
    memset(&d, 0, offsetof(decision, matched));
    d.winner = -1;
    d.flags = (uint32_t)rd(raw + 4, 4);
    d.vcpu = (uint32_t)rd(raw + 12, 4);
    d.paused = (d.flags & VM_EVENT_FLAG_VCPU_PAUSED) != 0;
    if (e->budget)
        d.over = over_budget(e->budget, c, &budget_tokens, &budget_stamp);
    cs.n = 0;
    cs.claims = NULL;
    if ((why = select_candidates(e, raw, &d, &cs)) >= 0 || (why = match(e, raw, &d, &cs)) >= 0 ||
        (why = decide_verdict(e, c, &d, &v)) >= 0 || (why = respond(e, raw, out, &d, &cs, &v)) >= 0)
        return why;

    /* Decided here: commit the budget and the rule state, then count and record. */
    if (e->budget) {
        e->budget->tokens = budget_tokens;
        e->budget->stamp = budget_stamp;
        e->budget->over += (uint64_t)d.over;
    }
    for (j = 0; j < d.nmatched; j++) {
        if (v.took[j]) {
            pe_state *st = &e->state[d.matched[j]];
            st->tokens = v.tokens[j];
            st->stamp = c->clock;
            st->has_stamp = 1;
        }
    }
    sort_messages(e, &d);
    c->mono_ns = now_ns(c);
    latency = c->mono_ns - t0;
    count(e, &d, latency);
    if (c->log) {
        record(e, c, &d, raw, (uint32_t)rd(out + 4, 4), latency, &has_alert, time_text);
        if (c->line_end)
            c->line_end[i] = (uint32_t)c->log_len;
        if (c->alert)
            c->alert[i] = (uint8_t)has_alert;
    }
    c->next_id++;
    return -1;
}

size_t pe_decide(pe_engine *e, pe_call *c, const uint8_t *reqs, size_t n, uint8_t *rsps)
{
    size_t i;
    char tbuf[40];
    wbuf time_text = {tbuf, 0};

    c->punt = -1;
    c->mono_ns = now_ns(c);
    c->mono_fresh = 1;
    if (c->own_clocks) {
        c->now_ns = wall_ns(c, c->mono_ns);
        c->clock = (double)c->mono_ns / 1e9;   /* as time.monotonic(): ns / 1e9 */
    }
    put_time(&time_text, c->now_ns);
    for (i = 0; i < n; i++) {
        int why;
        if (c->log && c->log_cap - c->log_len < c->record_max)
            break;             /* the caller writes the buffer out and calls again */
        why = decide_one(e, c, reqs + i * EVENT, rsps + i * EVENT, i, &time_text);
        if (why >= 0) {
            c->punt = why;
            e->punts[why]++;
            break;
        }
    }
    return i;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Drain, decide, log, respond: take what the ring has (at most c->max),
 * decide it; if every event was decided here (and none has an alert the
 * caller must copy to its alert stream, with finish_alerts), write the
 * records with one write(2) to c->fd (fd < 0 with c->log: the caller writes
 * them; no c->log: they are only counted) before the responses are put and
 * published (group commit: a record is on its way to the disk before its
 * answer). Otherwise the taken requests, the responses and records decided
 * so far stay in c->taken / c->rsps / c->log for the caller to finish. */
static int service_batch(pe_engine *e, pe_call *c)
{
    size_t n, i;

    c->notify = 0;
    n = vm_ring_take_requests(c->back, (vm_event_request_t *)c->taken, c->max);
    c->ntaken = n;
    c->log_len = 0;
    c->decided = n ? pe_decide(e, c, c->taken, n, c->rsps) : 0;
    if (c->decided < n || (c->log && c->fd < 0))
        return PE_UNFINISHED;
    if (c->finish_alerts && c->log && c->alert)
        for (i = 0; i < n; i++)
            if (c->alert[i])
                return PE_UNFINISHED;
    if (c->log && c->log_len && write_all(c->fd, c->log, c->log_len) < 0)
        return PE_LOG_FAILED;
    vm_ring_put_responses(c->back, (const vm_event_response_t *)c->rsps, n);
    c->notify = vm_ring_push_responses(c->back);
    return PE_SERVED;
}

/* One batch, or with a native notify, batch after batch (notifying after each) until the ring
 * is empty, a batch needs the caller, or max_batches were served. With a native wait too, an
 * empty ring is waited on (after the ring's final check, so no request published meanwhile is
 * missed) until wait_ms have passed since the call began, and a ring that never empties is left
 * then too: the whole answering loop runs in C, and the caller sees signals, idle work and stop
 * requests at least that often. c->served counts the
 * requests answered whole; the last batch's state is as service_batch leaves it. */
int pe_service(pe_engine *e, pe_call *c)
{
    uint32_t b = 0;
    uint64_t deadline = 0, now;
    int status, woke;

    c->served = 0;
    c->notify_failed = 0;
    c->wait_errno = 0;
    if (c->wait_fn)
        deadline = now_ns(c) + (uint64_t)c->wait_ms * 1000000u;
    for (;;) {
        status = service_batch(e, c);
        if (status != PE_SERVED)
            return status;
        if (c->ntaken) {
            c->served += c->ntaken;
            if (!c->notify_fn)
                return status;
            if (c->notify_fn(c->notify_ctx) < 0) {
                c->notify_failed = 1;
                return status;
            }
            if (++b >= c->max_batches)
                return status;
            /* A ring that never empties (every vCPU trapping as fast as it is answered) must
             * still hand back to the caller by the deadline: it sees signals only between calls.
             * Every 16th batch, so the clock is not read per event. */
            if (deadline && (b & 15) == 0 && now_ns(c) >= deadline)
                return status;
            continue;
        }
        if (!c->wait_fn || !c->notify_fn)
            return status;
        if (vm_ring_final_check_for_requests(c->back))
            continue;
        /* the last decision's clock is new enough for the deadline (a batch is microseconds) */
        now = c->mono_fresh ? c->mono_ns : now_ns(c);
        c->mono_fresh = 0;
        if (now >= deadline)
            return status;
        errno = 0;
        woke = c->wait_fn(c->wait_ctx, (int)((deadline - now + 999999u) / 1000000u));
        if (woke < 0)
            c->wait_errno = errno ? errno : EIO;
        if (woke <= 0)
            return status;
    }
}
