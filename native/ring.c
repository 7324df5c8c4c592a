/*
 * ring.c: batch operations on the vm_event shared ring, for both sides.
 *
 * The ring follows Xen's io/ring.h protocol. Requests and responses share
 * the slots: the requesting side (Xen; simulated here for tests and
 * benchmarks) writes requests at req_prod and reads responses at rsp_cons;
 * the responding side (the monitor) reads requests at req_cons and writes
 * responses at rsp_prod. Only the four producer/event indices live in the
 * shared page; each side keeps its private indices in its own struct.
 *
 * Barriers, as the ring macros place them:
 *   - before publishing a producer index: every slot write is visible first
 *     (xen_wmb; here a release store of the index);
 *   - after reading the other side's producer index: slot reads happen after
 *     it (xen_rmb; here an acquire load of the index);
 *   - between publishing an index and reading the other side's event index
 *     (the notify check) and in the final check: a full barrier (xen_mb).
 * The responding side copies every request out of the shared page exactly
 * once (the other side may rewrite the page at any time) and bounds every
 * count by the ring size, so a misbehaving producer cannot make it read
 * past the slots it owns.
 */
#include <errno.h>
#include <poll.h>
#include <string.h>

#include "vm_event_abi.h"

/* ---- layout checks: the ABI numbers the project relies on ------------- */
_Static_assert(sizeof(vm_event_request_t) == 400, "vm_event_request_t size");
_Static_assert(offsetof(vm_event_request_t, u) == 24, "offset of u");
_Static_assert(offsetof(vm_event_request_t, data) == 56, "offset of data");
_Static_assert(sizeof(struct vm_event_regs_x86) == 344, "x86 regs size");
_Static_assert(sizeof(((struct vm_event_emul_read_data *)0)->data) ==
               sizeof(struct vm_event_regs_x86) - sizeof(uint32_t),
               "emul read data fills the data union");
_Static_assert(offsetof(struct vm_event_sring, ring) == 64, "ring offset");
_Static_assert((VM_RING_SLOTS & (VM_RING_SLOTS - 1)) == 0,
               "slot count is a power of two");
_Static_assert((VM_RING_PAGE_SIZE - offsetof(struct vm_event_sring, ring)) /
                   sizeof(union vm_event_sring_entry) >= VM_RING_SLOTS &&
               (VM_RING_PAGE_SIZE - offsetof(struct vm_event_sring, ring)) /
                   sizeof(union vm_event_sring_entry) < 2 * VM_RING_SLOTS,
               "VM_RING_SLOTS is the page's entry count rounded down to 2^k");
_Static_assert(sizeof(struct vm_event_sring) <= VM_RING_PAGE_SIZE,
               "the ring fits one page");

/* ---- index access ----------------------------------------------------- */
static inline RING_IDX load_acquire(const RING_IDX *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline RING_IDX load_relaxed(const RING_IDX *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void store_release(RING_IDX *p, RING_IDX v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

static inline void full_barrier(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static inline union vm_event_sring_entry *slot(struct vm_event_sring *s,
                                               unsigned int nr_ents,
                                               RING_IDX idx)
{
    return &s->ring[idx & (nr_ents - 1)];
}

/* ---- set-up ----------------------------------------------------------- */
unsigned int vm_ring_slots_for(size_t bytes)
{
    size_t head = offsetof(struct vm_event_sring, ring);
    size_t fit;
    unsigned int p = 1;

    if (bytes < head + sizeof(union vm_event_sring_entry))
        return 0;
    fit = (bytes - head) / sizeof(union vm_event_sring_entry);
    if (fit > 0xffffffffu)
        fit = 0xffffffffu;
    /* __RD32: round down to a power of two. */
    while ((size_t)p * 2 <= fit && p < 0x80000000u)
        p *= 2;
    return p;
}

void vm_ring_shared_init(struct vm_event_sring *sring)
{
    sring->req_prod = 0;
    sring->rsp_prod = 0;
    sring->req_event = 1;
    sring->rsp_event = 1;
    memset(sring->pvt.pvt_pad, 0, sizeof(sring->pvt.pvt_pad));
    memset(sring->__pad, 0, sizeof(sring->__pad));
    full_barrier();
}

void vm_ring_front_init(struct vm_event_front_ring *front,
                        struct vm_event_sring *sring)
{
    front->req_prod_pvt = 0;
    front->rsp_cons = 0;
    front->nr_ents = vm_ring_slots_for(VM_RING_PAGE_SIZE);
    front->sring = sring;
}

void vm_ring_back_init(struct vm_event_back_ring *back,
                       struct vm_event_sring *sring)
{
    back->rsp_prod_pvt = 0;
    back->req_cons = 0;
    back->nr_ents = vm_ring_slots_for(VM_RING_PAGE_SIZE);
    back->sring = sring;
}

/* ---- requesting side (Xen) -------------------------------------------- */
unsigned int vm_ring_free_requests(const struct vm_event_front_ring *front)
{
    return front->nr_ents - (front->req_prod_pvt - front->rsp_cons);
}

size_t vm_ring_put_requests(struct vm_event_front_ring *front,
                            const vm_event_request_t *in, size_t n)
{
    size_t free_slots = vm_ring_free_requests(front);
    size_t i;

    if (n > free_slots)
        n = free_slots;
    for (i = 0; i < n; i++) {
        memcpy(&slot(front->sring, front->nr_ents, front->req_prod_pvt)->req,
               &in[i], sizeof(vm_event_request_t));
        front->req_prod_pvt++;
    }
    return n;
}

/* RING_PUSH_REQUESTS_AND_CHECK_NOTIFY; returns whether to notify. */
int vm_ring_push_requests(struct vm_event_front_ring *front)
{
    struct vm_event_sring *s = front->sring;
    RING_IDX old = load_relaxed(&s->req_prod);
    RING_IDX new = front->req_prod_pvt;

    store_release(&s->req_prod, new);
    full_barrier();
    return (RING_IDX)(new - load_relaxed(&s->req_event)) <
           (RING_IDX)(new - old);
}

/* One request, published at once (as Xen's vm_event_put_request does).
 * Returns 1 if it was placed, 0 if the ring is full and nothing changed. */
int vm_ring_put_request(struct vm_event_front_ring *front,
                        const vm_event_request_t *req)
{
    if (vm_ring_put_requests(front, req, 1) != 1)
        return 0;
    (void)vm_ring_push_requests(front);
    return 1;
}

unsigned int vm_ring_unconsumed_responses(const struct vm_event_front_ring *front)
{
    /* XEN_RING_NR_UNCONSUMED_RESPONSES (io/ring.h): Xen takes every published
     * response, including answers to no request (the bare unpause responses
     * of a recovering agent, docs/XEN-SEMANTICS.md section 7). */
    return load_acquire(&front->sring->rsp_prod) - front->rsp_cons;
}

size_t vm_ring_take_responses(struct vm_event_front_ring *front,
                              vm_event_response_t *out, size_t max)
{
    size_t n = vm_ring_unconsumed_responses(front);  /* acquire */
    size_t i;

    if (n > max)
        n = max;
    for (i = 0; i < n; i++) {
        memcpy(&out[i],
               &slot(front->sring, front->nr_ents, front->rsp_cons)->rsp,
               sizeof(vm_event_response_t));
        front->rsp_cons++;
    }
    if (n)
        store_release(&front->sring->rsp_event, front->rsp_cons + 1);
    return n;
}

/* ---- responding side (the monitor) ------------------------------------ */

/* XEN_RING_NR_UNCONSUMED_REQUESTS: what was published, but never more than
 * the slots not still holding a request we took and have not answered. */
unsigned int vm_ring_unconsumed_requests(const struct vm_event_back_ring *back)
{
    RING_IDX req = load_acquire(&back->sring->req_prod) - back->req_cons;
    RING_IDX rsp = back->nr_ents - (back->req_cons - back->rsp_prod_pvt);

    return req < rsp ? req : rsp;
}

/* Requests taken and not yet answered. */
unsigned int vm_ring_pending_responses(const struct vm_event_back_ring *back)
{
    return back->req_cons - back->rsp_prod_pvt;
}

size_t vm_ring_take_requests(struct vm_event_back_ring *back,
                             vm_event_request_t *out, size_t max)
{
    size_t n = vm_ring_unconsumed_requests(back);  /* acquire */
    size_t i;

    if (n > max)
        n = max;
    for (i = 0; i < n; i++) {
        /* One copy out of the shared page; only the copy is read after. */
        memcpy(&out[i],
               &slot(back->sring, back->nr_ents, back->req_cons)->req,
               sizeof(vm_event_request_t));
        back->req_cons++;
    }
    if (n)
        store_release(&back->sring->req_event, back->req_cons + 1);
    return n;
}

/* Writes responses into the slots of requests already taken, in order.
 * Never more than were taken: a response slot past req_cons may still hold
 * an unread request. Nothing is visible to the other side until
 * vm_ring_push_responses. */
size_t vm_ring_put_responses(struct vm_event_back_ring *back,
                             const vm_event_response_t *in, size_t n)
{
    size_t room = vm_ring_pending_responses(back);
    size_t i;

    if (n > room)
        n = room;
    for (i = 0; i < n; i++) {
        memcpy(&slot(back->sring, back->nr_ents, back->rsp_prod_pvt)->rsp,
               &in[i], sizeof(vm_event_response_t));
        back->rsp_prod_pvt++;
    }
    return n;
}

/* RING_PUSH_RESPONSES_AND_CHECK_NOTIFY; returns whether to notify. */
int vm_ring_push_responses(struct vm_event_back_ring *back)
{
    struct vm_event_sring *s = back->sring;
    RING_IDX old = load_relaxed(&s->rsp_prod);
    RING_IDX new = back->rsp_prod_pvt;

    store_release(&s->rsp_prod, new);
    full_barrier();
    return (RING_IDX)(new - load_relaxed(&s->rsp_event)) <
           (RING_IDX)(new - old);
}

/* RING_FINAL_CHECK_FOR_REQUESTS: before sleeping on the event channel, ask
 * to be notified of the next request, then look once more. */
int vm_ring_final_check_for_requests(struct vm_event_back_ring *back)
{
    if (vm_ring_unconsumed_requests(back))
        return 1;
    store_release(&back->sring->req_event, back->req_cons + 1);
    full_barrier();
    return vm_ring_unconsumed_requests(back) != 0;
}

/* ---- the floor benchmark ---------------------------------------------- */
uint64_t vm_ring_floor_loop(uint64_t n)
{
    union {
        struct vm_event_sring sring;
        unsigned char bytes[VM_RING_PAGE_SIZE];
    } page __attribute__((aligned(64)));
    struct vm_event_front_ring front;
    struct vm_event_back_ring back;
    vm_event_request_t req, got;
    vm_event_response_t rsp, back_rsp;
    uint64_t ok = 0, i;

    memset(&page, 0, sizeof(page));
    vm_ring_shared_init(&page.sring);
    vm_ring_front_init(&front, &page.sring);
    vm_ring_back_init(&back, &page.sring);
    memset(&req, 0, sizeof(req));
    req.version = VM_EVENT_INTERFACE_VERSION;
    req.reason = VM_EVENT_REASON_MEM_ACCESS;
    req.flags = VM_EVENT_FLAG_VCPU_PAUSED;
    req.u.mem_access.flags = MEM_ACCESS_W | MEM_ACCESS_R;

    for (i = 0; i < n; i++) {
        /* Xen: raise an event. */
        req.vcpu_id = (uint32_t)(i & 7);
        req.u.mem_access.gfn = i;
        if (!vm_ring_put_request(&front, &req))
            break;
        /* Monitor: take it, answer it. */
        if (vm_ring_take_requests(&back, &got, 1) != 1)
            break;
        memset(&rsp, 0, sizeof(rsp));
        rsp.version = got.version;
        rsp.vcpu_id = got.vcpu_id;
        rsp.reason = got.reason;
        rsp.flags = (got.flags & VM_EVENT_FLAG_VCPU_PAUSED) |
                    VM_EVENT_FLAG_EMULATE;
        if (vm_ring_put_responses(&back, &rsp, 1) != 1)
            break;
        (void)vm_ring_push_responses(&back);
        /* Xen: take the answer and check the echo that unpauses the vCPU. */
        if (vm_ring_take_responses(&front, &back_rsp, 1) != 1)
            break;
        if (back_rsp.version == VM_EVENT_INTERFACE_VERSION &&
            back_rsp.vcpu_id == req.vcpu_id &&
            back_rsp.reason == req.reason &&
            (back_rsp.flags & VM_EVENT_FLAG_VCPU_PAUSED))
            ok++;
    }
    return ok;
}

/* ---- the Xen side, replaying recorded requests ------------------------- */

/* Takes every published response (each must unpause a vCPU that waits for
 * one, as Xen's vm_event_resume checks), then puts recorded requests while
 * the ring has room, the next request's vCPU is not paused already (a paused
 * vCPU raises nothing) and fewer than `limit` were put in all; publishes
 * them. Returns how many it put. */
size_t vm_ring_replay(struct vm_event_front_ring *front, struct vm_ring_replay *r, uint64_t limit)
{
    vm_event_response_t rsp;
    size_t put = 0;

    while (vm_ring_take_responses(front, &rsp, 1) == 1) {
        uint8_t *p = &r->paused[rsp.vcpu_id & 255];
        r->answered++;
        if ((rsp.flags & VM_EVENT_FLAG_VCPU_PAUSED) && *p)
            *p = 0;
        else
            r->wrong++;
    }
    while (r->nreqs && r->next < limit && vm_ring_free_requests(front)) {
        const vm_event_request_t *req = &r->reqs[r->next % r->nreqs];
        uint8_t *p = &r->paused[req->vcpu_id & 255];
        if (req->flags & VM_EVENT_FLAG_VCPU_PAUSED) {
            if (*p)
                break;
            *p = 1;
        }
        vm_ring_put_requests(front, req, 1);
        r->next++;
        put++;
    }
    if (put)
        (void)vm_ring_push_requests(front);
    return put;
}

/* vm_ring_replay as an event-channel kick (a pe_notify_fn): r->front, r->limit. */
int vm_ring_replay_notify(void *replay)
{
    struct vm_ring_replay *r = replay;
    return (int)vm_ring_replay(r->front, r, r->limit);
}

/* The producer as the monitor's wait (a pe_wait_fn): the replay puts what it can at once, so a
   wait that finds nothing to put is one that would never be woken. */
int vm_ring_replay_wait(void *replay, int timeout_ms)
{
    (void)timeout_ms;
    return vm_ring_replay_notify(replay) > 0;
}

/* The monitor's kick on real Xen: xenevtchn_notify(handle, port), so that a native service call
   can answer batch after batch without returning to Python between them. */
int vm_evtchn_kick(void *kick)
{
    struct vm_evtchn_kick *k = kick;
    return k->notify(k->xce, k->port);
}

/* The monitor's wait on real Xen (a pe_wait_fn): poll the handle's descriptor for up to timeout_ms,
   and on a wake-up consume it as xenevtchn requires (pending, then unmask the port) so that the
   next event raises the descriptor again. 1: woken; 0: timed out; -1: failed, errno says why
   (EINTR: a signal arrived, which the caller's loop must see). */
int vm_evtchn_wait(void *kick, int timeout_ms)
{
    struct vm_evtchn_kick *k = kick;
    struct pollfd p = { .fd = k->fd, .events = POLLIN };
    int n, port;

    n = poll(&p, 1, timeout_ms);
    if (n <= 0)
        return n;
    if (!(p.revents & POLLIN)) {
        errno = EIO;                /* POLLERR / POLLHUP / POLLNVAL: the handle is gone */
        return -1;
    }
    port = k->pending(k->xce);
    if (port < 0)
        return -1;
    if (k->unmask(k->xce, (uint32_t)port) < 0)
        return -1;
    return 1;
}
