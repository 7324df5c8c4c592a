/*
 * vm_event_abi.h: the Xen vm_event request/response ABI, interface
 * version 7 (Xen 4.17), and the one-page shared ring that carries it.
 *
 * Written for policyc from the layout Xen documents in its public headers
 * (xen/vm_event.h, xen/io/ring.h). Names of structs, fields and constants
 * follow Xen's so code reads the same; tests/test_vm_event_abi.py compiles a
 * program against Debian's libxen-dev headers and checks every size, offset
 * and constant here against Xen's own.
 *
 * This file is the single source of truth for both the C compiler and the
 * cffi cdef (native/build_vm_event.py). To stay cdef-friendly it holds only:
 *   - the include guard and #include lines (dropped from the cdef),
 *   - "#define NAME value" integer constants (given to the cdef as
 *     "#define NAME ..." so the C compiler supplies the value),
 *   - plain struct/union/typedef declarations and function prototypes.
 * No other preprocessor conditionals, no expressions in array sizes, no
 * inline functions (static assertions live in ring.c).
 */
#ifndef POLICYC_VM_EVENT_ABI_H
#define POLICYC_VM_EVENT_ABI_H

#include <stddef.h>
#include <stdint.h>

#define VM_EVENT_INTERFACE_VERSION 0x00000007

/* ---- flags (vm_event_st.flags) ---------------------------------------- */
/* Request: the vCPU is paused. Response: unpause it (must be echoed). */
#define VM_EVENT_FLAG_VCPU_PAUSED        (1 << 0)
#define VM_EVENT_FLAG_FOREIGN            (1 << 1)
/* Response: emulate the faulting instruction, access rights unchanged. */
#define VM_EVENT_FLAG_EMULATE            (1 << 2)
/* Response: emulate with writes and side effects suppressed. */
#define VM_EVENT_FLAG_EMULATE_NOWRITE    (1 << 3)
#define VM_EVENT_FLAG_TOGGLE_SINGLESTEP  (1 << 4)
/* Response: data.emul.read feeds the emulated read (with EMULATE). */
#define VM_EVENT_FLAG_SET_EMUL_READ_DATA (1 << 5)
/* Response: refuse the CR/MSR write that raised the event (sync only). */
#define VM_EVENT_FLAG_DENY               (1 << 6)
/* Request: raised in view altp2m_idx. Response: resume in view altp2m_idx. */
#define VM_EVENT_FLAG_ALTERNATE_P2M      (1 << 7)
/* Response: load data.regs.x86 (GPRs, rflags, rip) into the vCPU. */
#define VM_EVENT_FLAG_SET_REGISTERS      (1 << 8)
/* Response: data.emul.insn is the instruction cache for the emulator. */
#define VM_EVENT_FLAG_SET_EMUL_INSN_DATA (1 << 9)
#define VM_EVENT_FLAG_GET_NEXT_INTERRUPT (1 << 10)
/* Response: step once, then switch to view u.fast_singlestep.p2midx. */
#define VM_EVENT_FLAG_FAST_SINGLESTEP    (1 << 11)
/* Request: from a nested guest; data.regs.x86.npt_base is valid. */
#define VM_EVENT_FLAG_NESTED_P2M         (1 << 12)
#define VM_EVENT_FLAG_RESET_VMTRACE      (1 << 13)
#define VM_EVENT_FLAG_RESET_FORK_STATE   (1 << 14)
#define VM_EVENT_FLAG_RESET_FORK_MEMORY  (1 << 15)

/* ---- reasons (vm_event_st.reason) ------------------------------------- */
#define VM_EVENT_REASON_UNKNOWN              0
#define VM_EVENT_REASON_MEM_ACCESS           1
#define VM_EVENT_REASON_MEM_SHARING          2
#define VM_EVENT_REASON_MEM_PAGING           3
#define VM_EVENT_REASON_WRITE_CTRLREG        4
#define VM_EVENT_REASON_MOV_TO_MSR           5
#define VM_EVENT_REASON_SOFTWARE_BREAKPOINT  6
#define VM_EVENT_REASON_SINGLESTEP           7
#define VM_EVENT_REASON_GUEST_REQUEST        8
#define VM_EVENT_REASON_DEBUG_EXCEPTION      9
#define VM_EVENT_REASON_CPUID                10
#define VM_EVENT_REASON_PRIVILEGED_CALL      11
#define VM_EVENT_REASON_INTERRUPT            12
#define VM_EVENT_REASON_DESCRIPTOR_ACCESS    13
#define VM_EVENT_REASON_EMUL_UNIMPLEMENTED   14
#define VM_EVENT_REASON_VMEXIT               15

/* ---- u.write_ctrlreg.index -------------------------------------------- */
#define VM_EVENT_X86_CR0   0
#define VM_EVENT_X86_CR3   1
#define VM_EVENT_X86_CR4   2
#define VM_EVENT_X86_XCR0  3

/* ---- u.mem_access.flags ----------------------------------------------- */
/* R/W/X: the kinds of access that violated; several may be set at once. */
#define MEM_ACCESS_R               (1 << 0)
#define MEM_ACCESS_W               (1 << 1)
#define MEM_ACCESS_X               (1 << 2)
#define MEM_ACCESS_RWX             (MEM_ACCESS_R | MEM_ACCESS_W | MEM_ACCESS_X)
#define MEM_ACCESS_RW              (MEM_ACCESS_R | MEM_ACCESS_W)
#define MEM_ACCESS_RX              (MEM_ACCESS_R | MEM_ACCESS_X)
#define MEM_ACCESS_WX              (MEM_ACCESS_W | MEM_ACCESS_X)
/* u.mem_access.gla holds a guest linear address. */
#define MEM_ACCESS_GLA_VALID       (1 << 3)
/* The access to gla itself faulted ... */
#define MEM_ACCESS_FAULT_WITH_GLA  (1 << 4)
/* ... or the fault hit the guest's own page-table walk for gla. */
#define MEM_ACCESS_FAULT_IN_GPT    (1 << 5)

/* ---- u.mem_paging.flags ----------------------------------------------- */
#define MEM_PAGING_DROP_PAGE   (1 << 0)
#define MEM_PAGING_EVICT_FAIL  (1 << 1)

/* ---- u.desc_access.descriptor ----------------------------------------- */
#define VM_EVENT_DESC_IDTR  1
#define VM_EVENT_DESC_GDTR  2
#define VM_EVENT_DESC_LDTR  3
#define VM_EVENT_DESC_TR    4

/*
 * ---- u.software_breakpoint.type, u.debug_exception.type,
 *      u.interrupt.x86.type ---------------------------------------------
 * x86 event types (Xen's hvm.h X86_EVENTTYPE_*; the public dm_op.h mirrors
 * them as XEN_DMOP_EVENT_* for re-injection).
 */
#define X86_EVENTTYPE_EXT_INTR          0
#define X86_EVENTTYPE_NMI               2
#define X86_EVENTTYPE_HW_EXCEPTION      3
#define X86_EVENTTYPE_SW_INTERRUPT      4
#define X86_EVENTTYPE_PRI_SW_EXCEPTION  5
#define X86_EVENTTYPE_SW_EXCEPTION      6

/* ---- the shared ring (policyc's names; Xen computes these with macros) */
/* One ring page, as Xen maps it for the monitor ring. */
#define VM_RING_PAGE_SIZE  4096
/* Slots in one page: (4096 - 64) / 400 = 10, rounded down to a power of 2. */
#define VM_RING_SLOTS      8

/* ---- register snapshots ----------------------------------------------- */

/* Segment limit (right-shifted by 12 if ar.g) and access rights. */
struct vm_event_x86_selector_reg {
    uint32_t limit : 20;
    uint32_t ar    : 12;
};

struct vm_event_regs_x86 {
    uint64_t rax;
    uint64_t rcx;
    uint64_t rdx;
    uint64_t rbx;
    uint64_t rsp;
    uint64_t rbp;
    uint64_t rsi;
    uint64_t rdi;
    uint64_t r8;
    uint64_t r9;
    uint64_t r10;
    uint64_t r11;
    uint64_t r12;
    uint64_t r13;
    uint64_t r14;
    uint64_t r15;
    uint64_t rflags;
    uint64_t dr6;
    uint64_t dr7;
    uint64_t rip;
    uint64_t cr0;
    uint64_t cr2;
    uint64_t cr3;
    uint64_t cr4;
    uint64_t sysenter_cs;
    uint64_t sysenter_esp;
    uint64_t sysenter_eip;
    uint64_t msr_efer;
    uint64_t msr_star;
    uint64_t msr_lstar;
    uint64_t gdtr_base;
    uint64_t npt_base;      /* valid with VM_EVENT_FLAG_NESTED_P2M */
    uint64_t vmtrace_pos;   /* ~0 when vmtrace is off */
    uint32_t cs_base;
    uint32_t ss_base;
    uint32_t ds_base;
    uint32_t es_base;
    uint64_t fs_base;
    uint64_t gs_base;
    struct vm_event_x86_selector_reg cs;
    struct vm_event_x86_selector_reg ss;
    struct vm_event_x86_selector_reg ds;
    struct vm_event_x86_selector_reg es;
    struct vm_event_x86_selector_reg fs;
    struct vm_event_x86_selector_reg gs;
    uint64_t shadow_gs;
    uint16_t gdtr_limit;
    uint16_t cs_sel;
    uint16_t ss_sel;
    uint16_t ds_sel;
    uint16_t es_sel;
    uint16_t fs_sel;
    uint16_t gs_sel;
    uint16_t _pad;
};

/* On a response with SET_REGISTERS only pc is applied on ARM. */
struct vm_event_regs_arm {
    uint64_t ttbr0;
    uint64_t ttbr1;
    uint64_t ttbcr;
    uint64_t pc;
    uint64_t cpsr;
};

/* ---- per-reason payloads (the union u) -------------------------------- */

struct vm_event_mem_access {
    uint64_t gfn;
    uint64_t offset;   /* byte offset of the access within the page */
    uint64_t gla;      /* valid if flags has MEM_ACCESS_GLA_VALID */
    uint32_t flags;    /* MEM_ACCESS_* */
    uint32_t _pad;
};

struct vm_event_write_ctrlreg {
    uint32_t index;    /* VM_EVENT_X86_CR0 ... */
    uint32_t _pad;
    uint64_t new_value;
    uint64_t old_value;
};

struct vm_event_singlestep {
    uint64_t gfn;
};

struct vm_event_fast_singlestep {
    uint16_t p2midx;   /* response: the view to return to after one step */
};

struct vm_event_debug {
    uint64_t gfn;
    uint64_t pending_dbg;   /* like VT-x PENDING_DBG */
    uint32_t insn_length;
    uint8_t  type;          /* X86_EVENTTYPE_* */
    uint8_t  _pad[3];
};

struct vm_event_mov_to_msr {
    uint64_t msr;
    uint64_t new_value;
    uint64_t old_value;
};

struct vm_event_desc_access {
    union {
        struct {
            uint32_t instr_info;          /* VMCS instruction information */
            uint32_t _pad1;
            uint64_t exit_qualification;  /* VMCS exit qualification */
        } vmx;
    } arch;
    uint8_t descriptor;                   /* VM_EVENT_DESC_* */
    uint8_t is_write;
    uint8_t _pad[6];
};

struct vm_event_cpuid {
    uint32_t insn_length;
    uint32_t leaf;
    uint32_t subleaf;
    uint32_t _pad;
};

struct vm_event_interrupt_x86 {
    uint32_t vector;
    uint32_t type;         /* X86_EVENTTYPE_* */
    uint32_t error_code;
    uint32_t _pad;
    uint64_t cr2;
};

struct vm_event_paging {
    uint64_t gfn;
    uint32_t p2mt;
    uint32_t flags;        /* MEM_PAGING_* */
};

struct vm_event_sharing {
    uint64_t gfn;
    uint32_t p2mt;
    uint32_t _pad;
};

/* Shares the data union with the x86 registers: 344 - 4 bytes of data. */
struct vm_event_emul_read_data {
    uint32_t size;
    uint8_t  data[340];
};

struct vm_event_emul_insn_data {
    uint8_t data[16];      /* must be filled completely */
};

struct vm_event_vmexit {
    struct {
        struct {
            uint64_t reason;
            uint64_t qualification;
        } vmx;
    } arch;
};

/* ---- the request / response (400 bytes) ------------------------------- */

typedef struct vm_event_st {
    uint32_t version;      /* VM_EVENT_INTERFACE_VERSION */
    uint32_t flags;        /* VM_EVENT_FLAG_* */
    uint32_t reason;       /* VM_EVENT_REASON_* */
    uint32_t vcpu_id;
    uint16_t altp2m_idx;   /* request and response */
    uint16_t _pad[3];

    union {
        struct vm_event_paging           mem_paging;
        struct vm_event_sharing          mem_sharing;
        struct vm_event_mem_access       mem_access;
        struct vm_event_write_ctrlreg    write_ctrlreg;
        struct vm_event_mov_to_msr       mov_to_msr;
        struct vm_event_desc_access      desc_access;
        struct vm_event_singlestep       singlestep;
        struct vm_event_fast_singlestep  fast_singlestep;
        struct vm_event_debug            software_breakpoint;
        struct vm_event_debug            debug_exception;
        struct vm_event_cpuid            cpuid;
        struct vm_event_vmexit           vmexit;
        union {
            struct vm_event_interrupt_x86 x86;
        } interrupt;
    } u;                   /* offset 24 */

    union {
        union {
            struct vm_event_regs_x86 x86;
            struct vm_event_regs_arm arm;
        } regs;
        union {
            struct vm_event_emul_read_data read;
            struct vm_event_emul_insn_data insn;
        } emul;
    } data;                /* offset 56 */
} vm_event_request_t, vm_event_response_t;

/* ---- the shared ring page (standard Xen ring layout) ------------------ */

typedef unsigned int RING_IDX;

union vm_event_sring_entry {
    vm_event_request_t  req;
    vm_event_response_t rsp;
};

/*
 * Xen declares ring[1] and sizes it from the page; with one 4 KiB page the
 * count is fixed, so it is spelt out. Entries start at byte 64 and end at
 * 64 + 8 * 400 = 3264; the rest of the page is unused.
 */
struct vm_event_sring {
    RING_IDX req_prod, req_event;
    RING_IDX rsp_prod, rsp_event;
    union {
        struct {
            uint8_t smartpoll_active;
        } netif;
        struct {
            uint8_t msg;
        } tapif_user;
        uint8_t pvt_pad[4];
    } pvt;
    uint8_t __pad[44];
    union vm_event_sring_entry ring[8];
};
typedef struct vm_event_sring vm_event_sring_t;

/* The requesting side's private indices (Xen, or a simulation of it). */
struct vm_event_front_ring {
    RING_IDX req_prod_pvt;
    RING_IDX rsp_cons;
    unsigned int nr_ents;
    struct vm_event_sring *sring;
};
typedef struct vm_event_front_ring vm_event_front_ring_t;

/* The responding side's private indices (the monitor, i.e. us). */
struct vm_event_back_ring {
    RING_IDX rsp_prod_pvt;
    RING_IDX req_cons;
    unsigned int nr_ents;
    struct vm_event_sring *sring;
};
typedef struct vm_event_back_ring vm_event_back_ring_t;

/* ---- ring operations (ring.c) ----------------------------------------- */

/* Slot count the standard ring macros give for a page of `bytes` bytes. */
unsigned int vm_ring_slots_for(size_t bytes);

/* SHARED_RING_INIT: zero the indices, set both event indices to 1. */
void vm_ring_shared_init(struct vm_event_sring *sring);
/* FRONT_RING_INIT / BACK_RING_INIT for one 4 KiB page. */
void vm_ring_front_init(struct vm_event_front_ring *front,
                        struct vm_event_sring *sring);
void vm_ring_back_init(struct vm_event_back_ring *back,
                       struct vm_event_sring *sring);

/* Requesting side (Xen). */
unsigned int vm_ring_free_requests(const struct vm_event_front_ring *front);
size_t vm_ring_put_requests(struct vm_event_front_ring *front,
                            const vm_event_request_t *in, size_t n);
int vm_ring_put_request(struct vm_event_front_ring *front,
                        const vm_event_request_t *req);
int vm_ring_push_requests(struct vm_event_front_ring *front);
unsigned int vm_ring_unconsumed_responses(const struct vm_event_front_ring *front);
size_t vm_ring_take_responses(struct vm_event_front_ring *front,
                              vm_event_response_t *out, size_t max);

/* Responding side (the monitor). */
unsigned int vm_ring_unconsumed_requests(const struct vm_event_back_ring *back);
unsigned int vm_ring_pending_responses(const struct vm_event_back_ring *back);
size_t vm_ring_take_requests(struct vm_event_back_ring *back,
                             vm_event_request_t *out, size_t max);
size_t vm_ring_put_responses(struct vm_event_back_ring *back,
                             const vm_event_response_t *in, size_t n);
int vm_ring_push_responses(struct vm_event_back_ring *back);
int vm_ring_final_check_for_requests(struct vm_event_back_ring *back);

/* Round trips through a private ring: the bare C floor for benchmarks. */
uint64_t vm_ring_floor_loop(uint64_t n);

/* The Xen side replaying recorded requests (benchmarks and storm tests): see ring.c. */
struct vm_ring_replay {
    const vm_event_request_t *reqs;   /* recorded requests, replayed in a cycle */
    uint64_t nreqs, next;             /* next: requests put so far */
    uint64_t answered, wrong;         /* responses taken; those that unpaused no paused vCPU */
    uint8_t paused[256];              /* per vCPU (vcpu_id & 255): waiting for its response */
    struct vm_event_front_ring *front;   /* for vm_ring_replay_notify */
    uint64_t limit;
};
size_t vm_ring_replay(struct vm_event_front_ring *front, struct vm_ring_replay *r, uint64_t limit);
int vm_ring_replay_notify(void *replay);
int vm_ring_replay_wait(void *replay, int timeout_ms);

/* Xen's event channel for a native monitor, over libxenevtchn's calls, which the caller loads at
   run time, with its handle, local port and the handle's file descriptor (see ring.c): the kick
   after responses (a pe_notify_fn, decide.h) and the wait for the next requests (a pe_wait_fn). */
struct vm_evtchn_kick {
    int (*notify)(void *xce, uint32_t port);
    void *xce;
    uint32_t port;
    int (*pending)(void *xce);                 /* xenevtchn_pending: the port that fired, or -1 */
    int (*unmask)(void *xce, uint32_t port);
    int fd;                                    /* xenevtchn_fd: readable when a port fired */
};
int vm_evtchn_kick(void *kick);
int vm_evtchn_wait(void *kick, int timeout_ms);

#endif /* POLICYC_VM_EVENT_ABI_H */
