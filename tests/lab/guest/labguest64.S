/* labguest64: the lab's long-mode PVH test guest, for the page-table remap of a watched region.
 *
 * It enters long mode from the PVH entry (32-bit, paging off) with its own IA-32e 4-level tables:
 * the first 8 MiB identity-mapped by 2 MiB pages, and one 4 KiB page at REMAP_VA (PML4[0] ->
 * PDPT[1] -> PD_V[0] -> PT_V[0]) mapped to frame A (gfn 0x206). Every entry has its Accessed bit
 * (and leaves their Dirty bit) set already, so the processor never writes a paging structure.
 * No interrupts, no IDT: nothing here faults (a fault is a triple fault, and the domain crashes). One
 * cpuid a round makes it exit to Xen at least that often (below).
 *
 * Each round it writes the round number through REMAP_VA and reads it back: landed or refused
 * (the policy, policies/lab-remap-vmx.vmi, denies writes to REMAP_VA's page). Once REMAP_AFTER of
 * those writes were refused (the enforcer is in place), it remaps REMAP_VA as a rootkit would: only
 * the leaf entry changes, to frame B (gfn 0x207), then invlpg, and writes through it at once (the
 * next instructions: only an enforcer that re-walks before the guest runs on can refuse that one;
 * one that re-walks after its response lost it live, tests/lab/README.md). From then on its writes through
 * REMAP_VA go to frame B (counted apart), and every round it also writes frame A through its
 * identity mapping, which must land (frame A is no longer REMAP_VA's: the enforcer released it).
 *
 * Report page (gfn 0x200), u32 each at offset:
 *   0 magic 0x34364c50 ('PL64')   4 round
 *   8 pre_landed   12 pre_blocked    (through REMAP_VA while it maps frame A)
 *  16 post_landed  20 post_blocked   (through REMAP_VA once it maps frame B)
 *  24 alias_landed 28 alias_blocked  (frame A through its identity mapping, after the remap)
 *  32 remapped (0 or 1)            36 the round of the remap
 *  40 fault (0xffffffff: none; not written: there is no IDT)
 *  44 REMAP_VA   48 frame A's address   52 frame B's address   56 PT_V's address
 * Every REPORT_EVERY rounds (until REPORT_UNTIL) one line on Xen's debug port 0xe9:
 * "(dN) LABGUEST64 round=.. pre=L/B post=L/B alias=L/B".
 */
#define REMAP_VA 0x40000000
#define REMAP_AFTER 256
#define REPORT_EVERY 256
#define REPORT_UNTIL 2048
#define PG_P 0x1
#define PG_RW 0x2
#define PG_A 0x20
#define PG_D 0x40
#define PG_PS 0x80
#define TABLE (PG_P | PG_RW | PG_A)
#define LEAF (PG_P | PG_RW | PG_A | PG_D)

        .section .note.Xen, "a"
        .align 4
        .long 4, 4, 18          /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long _start

        .globl remap_va
        .set remap_va, REMAP_VA

        .text
        .code32
        .globl _start
_start:
        cli
        lgdt gdt_desc
        mov %cr4, %eax
        or $0x20, %eax                  /* PAE */
        mov %eax, %cr4
        mov $pml4, %eax
        mov %eax, %cr3
        mov $0xc0000080, %ecx           /* EFER.LME */
        rdmsr
        or $0x100, %eax
        wrmsr
        mov %cr0, %eax
        or $0x80000001, %eax            /* PG (PE is on already) */
        mov %eax, %cr0
        ljmp $0x08, $long64

        .code64
long64:
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov %ax, %fs
        mov %ax, %gs
        lea stack_top(%rip), %rsp
        movl $0x34364c50, R_MAGIC
        movl $0xffffffff, R_FAULT
        movl $REMAP_VA, R_VA
        movl $frame_a, R_A
        movl $frame_b, R_B
        movl $pt_v, R_PTV
        lea msg_start(%rip), %rsi
        call puts

round:
        incl R_ROUND
        mov R_ROUND, %eax
        mov $REMAP_VA, %rdi
        mov %eax, (%rdi)                /* the attack: a write through the watched address */
        mov (%rdi), %ebx
        cmpl $0, R_REMAPPED
        jne 3f
        cmp %eax, %ebx
        jne 1f
        incl R_PRE_LANDED
        jmp 5f
1:      incl R_PRE_BLOCKED
        cmpl $REMAP_AFTER, R_PRE_BLOCKED
        jb 5f
        /* the remap: REMAP_VA's leaf entry to frame B, nothing else; then its TLB entry goes */
        movq $(frame_b + LEAF), pt_v
        invlpg (%rdi)
        /* and at once, as a rootkit would, a write through it: no exit, no delay in between */
        mov R_ROUND, %eax
        mov %eax, (%rdi)
        mov (%rdi), %ebx
        movl $1, R_REMAPPED
        mov %eax, R_REMAP_ROUND
        push %rax
        lea msg_remap(%rip), %rsi
        call puts
        call puthex
        lea msg_nl(%rip), %rsi
        call puts
        pop %rax
3:      cmp %eax, %ebx
        jne 4f
        incl R_POST_LANDED
        jmp 6f
4:      incl R_POST_BLOCKED
6:      /* frame A through its identity mapping: no longer REMAP_VA's page */
        mov %eax, frame_a
        mov frame_a, %ebx
        cmp %eax, %ebx
        jne 7f
        incl R_ALIAS_LANDED
        jmp 5f
7:      incl R_ALIAS_BLOCKED
5:
        cmpl $REPORT_UNTIL, R_ROUND
        ja 8f
        testl $(REPORT_EVERY-1), R_ROUND
        jnz 8f
        call report
8:      /* one exit to the hypervisor a round: without any (the prints stop at REPORT_UNTIL) the Bochs 3.0
           lab stalled, Xen's serial stopping mid-line and dom0 never running again */
        xor %eax, %eax
        cpuid
        mov $200000, %ecx
9:      dec %ecx
        jnz 9b
        jmp round

/* "LABGUEST64 round=.. pre=L/B post=L/B alias=L/B" */
report:
        lea msg_round(%rip), %rsi; call puts; mov R_ROUND, %eax; call puthex
        lea msg_pre(%rip), %rsi; call puts; mov R_PRE_LANDED, %eax; call puthex
        lea msg_sl(%rip), %rsi; call puts; mov R_PRE_BLOCKED, %eax; call puthex
        lea msg_post(%rip), %rsi; call puts; mov R_POST_LANDED, %eax; call puthex
        lea msg_sl(%rip), %rsi; call puts; mov R_POST_BLOCKED, %eax; call puthex
        lea msg_alias(%rip), %rsi; call puts; mov R_ALIAS_LANDED, %eax; call puthex
        lea msg_sl(%rip), %rsi; call puts; mov R_ALIAS_BLOCKED, %eax; call puthex
        lea msg_nl(%rip), %rsi; call puts
        ret

/* puts: the NUL-terminated string at %rsi to port 0xe9 */
puts:   push %rax
        push %rdx
        mov $0xe9, %dx
1:      lodsb
        test %al, %al
        jz 2f
        outb %al, %dx
        jmp 1b
2:      pop %rdx
        pop %rax
        ret

/* puthex: %eax as 8 hex digits to port 0xe9 */
puthex: push %rax
        push %rbx
        push %rcx
        push %rdx
        mov %eax, %ebx
        mov $8, %ecx
        mov $0xe9, %dx
1:      rol $4, %ebx
        mov %ebx, %eax
        and $0xf, %eax
        lea hexdigits(%rip), %rdx
        movb (%rdx,%rax), %al
        mov $0xe9, %dx
        outb %al, %dx
        loop 1b
        pop %rdx
        pop %rcx
        pop %rbx
        pop %rax
        ret

        .section .rodata
        .align 8
gdt:    .quad 0
        .quad 0x00af9a000000ffff        /* 0x08 code64 */
        .quad 0x00cf92000000ffff        /* 0x10 data */
gdt_desc:
        .word 3*8-1
        .long gdt
hexdigits: .ascii "0123456789abcdef"
msg_start: .asciz "LABGUEST64 start: long mode, report=0x200000\n"
msg_remap: .asciz "LABGUEST64 remapped the watched address to frame B in round "
msg_round: .asciz "LABGUEST64 round="
msg_pre:   .asciz " pre="
msg_post:  .asciz " post="
msg_alias: .asciz " alias="
msg_sl:    .asciz "/"
msg_nl:    .asciz "\n"

        .section .data
        .align 4096
report_page:                    /* gfn 0x200 */
        .space 4096
        /* the page tables, each on its own frame (gfn 0x201-0x205), nothing else on them */
pml4:   .quad pdpt + TABLE
        .space 4096 - 8
pdpt:   .quad pd_id + TABLE                     /* 0 .. 1 GiB: identity */
        .quad pd_v + TABLE                      /* 1 GiB ..: REMAP_VA */
        .space 4096 - 16
pd_id:  .quad 0x000000 + LEAF + PG_PS           /* 4 x 2 MiB: 0 .. 8 MiB */
        .quad 0x200000 + LEAF + PG_PS
        .quad 0x400000 + LEAF + PG_PS
        .quad 0x600000 + LEAF + PG_PS
        .space 4096 - 32
pd_v:   .quad pt_v + TABLE
        .space 4096 - 8
        .globl pt_v
pt_v:   .quad frame_a + LEAF                    /* REMAP_VA -> frame A (the remap: frame B) */
        .space 4096 - 8
        .align 4096
        .globl frame_a
frame_a:                        /* REMAP_VA's frame until the remap */
        .space 4096
        .globl frame_b
frame_b:                        /* and after it */
        .space 4096

        .section .bss
        .align 4096
stack:  .space 4096
stack_top:

        .set R_MAGIC,        report_page + 0
        .set R_ROUND,        report_page + 4
        .set R_PRE_LANDED,   report_page + 8
        .set R_PRE_BLOCKED,  report_page + 12
        .set R_POST_LANDED,  report_page + 16
        .set R_POST_BLOCKED, report_page + 20
        .set R_ALIAS_LANDED, report_page + 24
        .set R_ALIAS_BLOCKED, report_page + 28
        .set R_REMAPPED,     report_page + 32
        .set R_REMAP_ROUND,  report_page + 36
        .set R_FAULT,        report_page + 40
        .set R_VA,           report_page + 44
        .set R_A,            report_page + 48
        .set R_B,            report_page + 52
        .set R_PTV,          report_page + 56
