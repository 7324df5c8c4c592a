/* labguest: the lab's PVH test guest (32-bit, flat segments, paging off, so va == pa).
 *
 * Adapted from the tiny PVH guest written for this project's Xen lab
 * (/work/shared/xenlab/src/tinypvh.S: the PVH ELF note, GDT/IDT set-up); the
 * attack/benign loop, the self-report page and the console lines are new.
 *
 * Each round it tries, and checks from inside whether it took effect:
 *   - a CR4 write that flips CR4.TSD          (attack: the register policies deny it)
 *   - wrmsr IA32_SYSENTER_EIP (0x176) = round (attack: denied)
 *   - cpuid leaf 0x40000000                   (benign: logged)
 *   - int3 (its own #BP handler counts it)    (the guest's own breakpoint)
 *   - passes the instruction at bp_site       (the memory policy's `execute pa` site)
 *   - a write to the watched page   gfn 0x201 (attack under the memory policy: denied)
 *   - a write to the unwatched page gfn 0x202 (benign: must land)
 *   - a CR0.WP flip (harmless with paging off) (attack under the strategies policy: denied)
 *   - a read of the secret page     gfn 0x203 (its real word, or what `deny feed` gives instead)
 *   - a call of exec_fn on          gfn 0x204 (it runs, or `deny with #UD` injects #UD, whose
 *     handler counts it and returns past the call)
 *   - sidt, twice (a probe of the IDT register; counted)
 *   - lidt of another limit (landed if sidt reads it back; then the real one again), or an
 *     injected #GP, whose handler counts it and skips the 7-byte lidt
 *   - one single step (TF): the #DB handler counts it and clears TF
 *   - a guest request (HVMOP_guest_request_vm_event, issued with vmcall, or vmmcall on AMD: there is
 *     no hypercall page) with esi=1; every 64th round another with esi=2 (the quarantine request)
 *   - a CR3 write (harmless with paging off) read back: did it land?
 *   - lgdt of another limit (like lidt), sgdt; lldt of the LDT (odd rounds) or of none (even), sldt;
 *     ltr of the TSS (its busy bit cleared first), str. A refused load is an injected #GP, which
 *     gp_handler counts in the counter the round named (gp_count) and resumes at gp_resume
 *   - a read, a write and a read back of the probe page (gfn 0x205; `access to` watches it)
 *   - a read of its own first byte at bp_site: the original 0xff, or 0xcc if a breakpoint shows
 * The counters live on the report page (gfn 0x200, layout below), which the
 * dom0 driver reads with a foreign map; every REPORT_EVERY rounds the guest
 * also prints them (until round REPORT_UNTIL) on Xen's HVM debug port 0xe9 ("(dN) LABGUEST ..." on the
 * Xen console / `xl dmesg`). It never stops, so it still runs after teardown.
 *
 * Report page, u32 each at offset:
 *   0 magic 0x42414c50 ('PLAB')   4 round
 *   8 cr4_landed   12 cr4_blocked   16 msr_landed    20 msr_blocked
 *  24 cpuid_count  28 int3_handled  32 wat_landed    36 wat_blocked
 *  40 unw_landed   44 unw_blocked   48 bp_site_passes 52 last_fault_vector (0xffffffff: none)
 *  56 bp_site address               60 watched page address   64 unwatched page address
 *  68 cr0_landed   72 cr0_blocked   76 rd_landed     80 rd_blocked
 *  84 exec_landed  88 exec_blocked  92 sidt          96 lidt_landed
 * 100 lidt_blocked 104 db
 * 108 greq         112 greq_failed  116 qreq          120 cr3_landed
 * 124 cr3_blocked  128 lgdt_landed  132 lgdt_blocked  136 sgdt
 * 140 lldt_landed  144 lldt_blocked 148 sldt          152 ltr_landed
 * 156 ltr_blocked  160 str          164 acc           168 acc_wr_landed
 * 172 acc_wr_blocked 176 bp_read_ok 180 bp_read_bad
 */
#define REPORT_EVERY 1024
#define IDT_ALT_LIMIT (31*8-1)
#define SECRET_WORD 0x5ec2e7ed  /* the secret page's word; a `deny feed` gives another */
#define GDT_ALT_LIMIT (5*8-1)  /* the GDT without its spare last entry */
#define SEL_LDT 0x18
#define SEL_TSS 0x20
#define HYPERVISOR_hvm_op 34            /* xen/xen.h */
#define HVMOP_guest_request_vm_event 24 /* xen/hvm/hvm_op.h */
#define REPORT_UNTIL 8192   /* then quiet: the serial console carries the lab's markers */
        .code32
        .section .note.Xen, "a"
        .align 4
        .long 4, 4, 18          /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long _start

        .text
        .globl _start
_start:
        cli
        lgdt gdt_desc
        ljmp $0x08, $1f
1:      mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov %ax, %fs
        mov %ax, %gs
        mov $stack_top, %esp
        /* IDT: every vector -> fault handler (records the vector, prints, halts); #BP -> bp_handler,
           #UD -> ud_handler */
        mov $idt, %edi
        xor %ebx, %ebx
2:      lea fault_stubs(,%ebx,8), %eax
        cmp $3, %ebx
        jne 3f
        mov $bp_handler, %eax
3:      cmp $6, %ebx
        jne 4f
        mov $ud_handler, %eax
4:      cmp $1, %ebx
        jne 5f
        mov $db_handler, %eax
5:      cmp $13, %ebx
        jne 6f
        mov $gp_handler, %eax
6:      movw %ax, (%edi)
        movw $0x08, 2(%edi)
        movw $0x8E00, 4(%edi)
        shr $16, %eax
        movw %ax, 6(%edi)
        add $8, %edi
        inc %ebx
        cmp $32, %ebx
        jne 2b
        lidt idt_desc
        /* the GDT's LDT (SEL_LDT) and TSS (SEL_TSS) descriptors */
        mov $ldt_table, %eax
        mov $gdt+SEL_LDT, %edi
        mov $0x82, %dl
        call set_sysdesc
        mov $tss, %eax
        mov $gdt+SEL_TSS, %edi
        mov $0x89, %dl
        call set_sysdesc
        /* the hypercall instruction: vmcall on Intel, vmmcall on AMD ("GenuineIntel" in cpuid 0) */
        xor %eax, %eax
        cpuid
        cmp $0x756e6547, %ebx
        je 1f
        movb $1, hc_amd
1:      movl $0x42414c50, R_MAGIC
        movl $0xffffffff, R_FAULT
        movl $bp_site, R_BPADDR
        movl $watched, R_WADDR
        movl $unwatched, R_UADDR
        mov $msg_start, %esi
        call puts

round:
        incl R_ROUND
        /* --- CR4.TSD flip: did it land? */
        mov %cr4, %eax
        xor $0x4, %eax
        mov %eax, %cr4
        mov %cr4, %ebx
        cmp %eax, %ebx
        jne 4f
        incl R_CR4_LANDED
        jmp 5f
4:      incl R_CR4_BLOCKED
5:
        /* --- wrmsr SYSENTER_EIP = 0x1000 + round*16 (changes every round), read back */
        mov R_ROUND, %eax
        shl $4, %eax
        add $0x1000, %eax
        mov %eax, %edi
        mov $0x176, %ecx
        xor %edx, %edx
        wrmsr
        mov $0x176, %ecx
        rdmsr
        cmp %edi, %eax
        jne 6f
        incl R_MSR_LANDED
        jmp 7f
6:      incl R_MSR_BLOCKED
7:
        /* --- cpuid (benign) */
        mov $0x40000000, %eax
        xor %ecx, %ecx
        cpuid
        incl R_CPUID
        /* --- the guest's own int3 */
        int3
        /* --- the policy's breakpoint site: a plain instruction the enforcer may patch */
        .globl bp_site
bp_site:
        incl R_BPPASS
        /* --- write the watched page: did it land? */
        mov R_ROUND, %eax
        mov %eax, watched
        mov watched, %ebx
        cmp %eax, %ebx
        jne 8f
        incl R_WAT_LANDED
        jmp 9f
8:      incl R_WAT_BLOCKED
9:
        /* --- write the unwatched page: must land */
        mov R_ROUND, %eax
        mov %eax, unwatched
        mov unwatched, %ebx
        cmp %eax, %ebx
        jne 10f
        incl R_UNW_LANDED
        jmp 11f
10:     incl R_UNW_BLOCKED
11:
        /* --- CR0.WP flip (no effect with paging off): did it land? */
        mov %cr0, %eax
        xor $0x10000, %eax
        mov %eax, %cr0
        mov %cr0, %ebx
        cmp %eax, %ebx
        jne 14f
        incl R_CR0_LANDED
        jmp 15f
14:     incl R_CR0_BLOCKED
15:
        /* --- read the secret page: its own word, or one a `deny feed` gave instead */
        mov secret, %eax
        cmp $SECRET_WORD, %eax
        jne 16f
        incl R_RD_LANDED
        jmp 17f
16:     incl R_RD_BLOCKED
17:
        /* --- run exec_fn: it counts itself, or ud_handler counts a #UD and returns past the call */
        call exec_fn
        /* --- sidt: a probe of the IDT register */
        sidt scratch_desc
        incl R_SIDT
        /* --- lidt of another limit: landed if sidt reads it back (then the real one again); a
           refused one is an injected #GP, which gp_handler counts and resumes after */
        movl $R_LIDT_BLOCKED, gp_count
        movl $31f, gp_resume
        lidt idt_desc_alt
31:     movl $0, gp_count
        sidt scratch_desc
        incl R_SIDT
        cmpw $IDT_ALT_LIMIT, scratch_desc
        jne 18f
        incl R_LIDT_LANDED
        lidt idt_desc
18:
        /* --- a guest request (esi=1); every 64th round a quarantine request (esi=2) */
        mov $1, %esi
        call guest_request
        testl $63, R_ROUND
        jnz 20f
        incl R_QREQ
        mov $2, %esi
        call guest_request
20:
        /* --- CR3 write (paging is off: the value is not used): did it land? */
        mov %cr3, %eax
        xor $0x1000, %eax
        mov %eax, %cr3
        mov %cr3, %ebx
        cmp %eax, %ebx
        jne 21f
        incl R_CR3_LANDED
        jmp 22f
21:     incl R_CR3_BLOCKED
22:
        /* --- lgdt of another limit: a #GP (gp_handler counts it) or it landed (then the real one) */
        movl $R_LGDT_BLOCKED, gp_count
        movl $32f, gp_resume
        lgdt gdt_desc_alt
32:     movl $0, gp_count
        sgdt scratch_desc
        incl R_SGDT
        cmpw $GDT_ALT_LIMIT, scratch_desc
        jne 23f
        incl R_LGDT_LANDED
        lgdt gdt_desc
23:
        /* --- lldt: the LDT in odd rounds, none in even ones (allowed: sldt must read it back) */
        xor %eax, %eax
        testl $1, R_ROUND
        jz 24f
        mov $SEL_LDT, %eax
24:     movl $R_LLDT_BLOCKED, gp_count
        movl $25f, gp_resume
        lldt %ax
        movl $0, gp_count
        xor %ebx, %ebx
        sldt %bx
        incl R_SLDT
        cmp %ax, %bx
        jne 25f
        incl R_LLDT_LANDED
25:     movl $0, gp_count
        /* --- ltr of the TSS (busy bit cleared first, so a landed one can land again), str */
        andb $0xfd, gdt+SEL_TSS+5
        movl $R_LTR_BLOCKED, gp_count
        movl $26f, gp_resume
        mov $SEL_TSS, %ax
        ltr %ax
        movl $0, gp_count
        incl R_LTR_LANDED
26:     movl $0, gp_count
        str %bx
        incl R_STR
        /* --- the probe page (`access to`): a read, a write, a read back */
        mov probe, %eax
        incl R_ACC
        mov R_ROUND, %eax
        mov %eax, probe
        incl R_ACC
        mov probe, %ebx
        incl R_ACC
        cmp %eax, %ebx
        jne 27f
        incl R_ACC_WR_LANDED
        jmp 28f
27:     incl R_ACC_WR_BLOCKED
28:
        /* --- read bp_site's own first byte (incl: 0xff); a visible breakpoint reads 0xcc */
        movzbl bp_site, %eax
        cmp $0xff, %eax
        jne 29f
        incl R_BPREAD_OK
        jmp 30f
29:     incl R_BPREAD_BAD
30:
        /* --- one single step: TF set by popf traps after the next instruction; db_handler counts */
        pushf
        orl $0x100, (%esp)
        popf
        nop
        /* --- every REPORT_EVERY rounds: one console line */
        cmpl $REPORT_UNTIL, R_ROUND
        ja 12f
        testl $(REPORT_EVERY-1), R_ROUND
        jnz 12f
        call report
12:     mov $200000, %ecx
13:     dec %ecx
        jnz 13b
        jmp round

/* one line: "LABGUEST round=.. cr4=L/B msr=L/B cpuid=.. int3=.. bp=.. wat=L/B unw=L/B" */
report:
        mov $msg_round, %esi; call puts; mov R_ROUND, %eax; call puthex
        mov $msg_cr4, %esi; call puts; mov R_CR4_LANDED, %eax; call puthex
        mov $msg_sl, %esi; call puts; mov R_CR4_BLOCKED, %eax; call puthex
        mov $msg_msr, %esi; call puts; mov R_MSR_LANDED, %eax; call puthex
        mov $msg_sl, %esi; call puts; mov R_MSR_BLOCKED, %eax; call puthex
        mov $msg_cpuid, %esi; call puts; mov R_CPUID, %eax; call puthex
        mov $msg_int3, %esi; call puts; mov R_INT3, %eax; call puthex
        mov $msg_bp, %esi; call puts; mov R_BPPASS, %eax; call puthex
        mov $msg_wat, %esi; call puts; mov R_WAT_LANDED, %eax; call puthex
        mov $msg_sl, %esi; call puts; mov R_WAT_BLOCKED, %eax; call puthex
        mov $msg_unw, %esi; call puts; mov R_UNW_LANDED, %eax; call puthex
        mov $msg_sl, %esi; call puts; mov R_UNW_BLOCKED, %eax; call puthex
        mov $msg_nl, %esi; call puts
        ret

/* puts: NUL-terminated string at %esi to port 0xe9 */
puts:   push %eax
        push %edx
        mov $0xe9, %dx
1:      lodsb
        test %al, %al
        jz 2f
        outb %al, %dx
        jmp 1b
2:      pop %edx
        pop %eax
        ret

/* puthex: %eax as 8 hex digits to port 0xe9 */
puthex: push %eax
        push %ebx
        push %ecx
        push %edx
        mov %eax, %ebx
        mov $8, %ecx
        mov $0xe9, %dx
1:      rol $4, %ebx
        mov %ebx, %eax
        and $0xf, %eax
        movb hexdigits(%eax), %al
        outb %al, %dx
        loop 1b
        pop %edx
        pop %ecx
        pop %ebx
        pop %eax
        ret

bp_handler:
        incl R_INT3
        iret

/* #DB from the round's single step: count it, clear TF in the saved EFLAGS */
db_handler:
        incl R_DB
        andl $~0x100, 8(%esp)
        iret

/* #GP: only ever injected (a refused descriptor-table load), where the round named the counter
   (gp_count) and where to resume (gp_resume); anywhere else it is a fault like the others */
gp_handler:
        cmpl $0, gp_count
        je fault_stubs+13*8
        push %eax
        mov gp_count, %eax
        incl (%eax)
        mov gp_resume, %eax
        mov %eax, 8(%esp)           /* the saved EIP, above the saved eax and the error code */
        pop %eax
        add $4, %esp                /* the error code */
        iret

/* guest_request: HVMOP_guest_request_vm_event with esi as the tag the policy's rules test; counts
   it (R_GREQ for tag 1), or a hypercall that failed */
guest_request:
        mov $HYPERVISOR_hvm_op, %eax
        mov $HVMOP_guest_request_vm_event, %ebx
        xor %ecx, %ecx
        cmpb $0, hc_amd
        jne 1f
        vmcall
        jmp 2f
1:      vmmcall
2:      test %eax, %eax
        jnz 3f
        cmp $1, %esi
        jne 4f
        incl R_GREQ
        ret
3:      incl R_GREQ_FAILED
4:      ret

/* set_sysdesc: a system descriptor at %edi: base %eax, limit 0x67, access byte %dl */
set_sysdesc:
        movw $0x67, (%edi)
        movw %ax, 2(%edi)
        shr $16, %eax
        movb %al, 4(%edi)
        movb %dl, 5(%edi)
        movb $0, 6(%edi)
        movb %ah, 7(%edi)
        ret

/* #UD: only ever injected (by `deny with #UD` on exec_fn's page), at exec_fn's first instruction
   just after `call exec_fn` pushed its return address: drop the fault frame (EIP, CS, EFLAGS; no
   error code) and return to the caller as exec_fn would have. */
ud_handler:
        incl R_EXEC_BLOCKED
        add $12, %esp
        ret

/* 32 stubs of 8 bytes: push the vector, then go to fault_common */
        .align 8
fault_stubs:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .align 8
        push $\v
        jmp fault_common
        .endr
fault_common:
        pop %eax
        mov %eax, R_FAULT
        mov $msg_fault, %esi
        call puts
        call puthex
        mov $msg_nl, %esi
        call puts
1:      hlt
        jmp 1b

        .section .rodata
        .align 8
gdt_desc:
        .word 6*8-1
        .long gdt
gdt_desc_alt:                   /* the same table without its spare entry: a load that can be seen */
        .word GDT_ALT_LIMIT
        .long gdt
idt_desc:
        .word 32*8-1
        .long idt
idt_desc_alt:                   /* the same table, one entry shorter: a load that can be seen */
        .word IDT_ALT_LIMIT
        .long idt
hexdigits: .ascii "0123456789abcdef"
msg_start: .asciz "LABGUEST start report=0x200000 watched=0x201000 unwatched=0x202000\n"
msg_round: .asciz "LABGUEST round="
msg_cr4:   .asciz " cr4="
msg_msr:   .asciz " msr="
msg_cpuid: .asciz " cpuid="
msg_int3:  .asciz " int3="
msg_bp:    .asciz " bp="
msg_wat:   .asciz " wat="
msg_unw:   .asciz " unw="
msg_sl:    .asciz "/"
msg_nl:    .asciz "\n"
msg_fault: .asciz "LABGUEST FAULT vector="

        .section .data
        .align 4096
report_page:                    /* gfn 0x200 */
        .space 4096
        .globl watched
watched:                        /* gfn 0x201: the memory policy's watched page */
        .space 4096
        .globl unwatched
unwatched:                      /* gfn 0x202: never watched */
        .space 4096
        .globl secret
secret:                         /* gfn 0x203: its first word is read every round */
        .long SECRET_WORD
        .space 4092
        .globl exec_fn
exec_fn:                        /* gfn 0x204: code, called every round */
        incl R_EXEC_LANDED
        ret
        .align 4096
        .globl probe
probe:                          /* gfn 0x205: read, written and read back every round */
        .space 4096
        .align 8
gdt:    .quad 0                 /* gfn 0x206: writable, for the TSS's busy bit */
        .quad 0x00cf9a000000ffff   /* 0x08 code32 flat */
        .quad 0x00cf92000000ffff   /* 0x10 data32 flat */
        .quad 0                    /* SEL_LDT, set at start */
        .quad 0                    /* SEL_TSS, set at start */
        .quad 0                    /* spare: gdt_desc_alt leaves it out */
gp_count: .long 0               /* the counter an injected #GP bumps now (0: none expected) */
gp_resume: .long 0
hc_amd: .byte 0

        .section .bss
        .align 4096
idt:    .space 4096
scratch_desc: .space 8
ldt_table: .space 0x68
tss:    .space 0x68
stack:  .space 4096
stack_top:

        .set R_MAGIC,       report_page + 0
        .set R_ROUND,       report_page + 4
        .set R_CR4_LANDED,  report_page + 8
        .set R_CR4_BLOCKED, report_page + 12
        .set R_MSR_LANDED,  report_page + 16
        .set R_MSR_BLOCKED, report_page + 20
        .set R_CPUID,       report_page + 24
        .set R_INT3,        report_page + 28
        .set R_WAT_LANDED,  report_page + 32
        .set R_WAT_BLOCKED, report_page + 36
        .set R_UNW_LANDED,  report_page + 40
        .set R_UNW_BLOCKED, report_page + 44
        .set R_BPPASS,      report_page + 48
        .set R_FAULT,       report_page + 52
        .set R_BPADDR,      report_page + 56
        .set R_WADDR,       report_page + 60
        .set R_UADDR,       report_page + 64
        .set R_CR0_LANDED,  report_page + 68
        .set R_CR0_BLOCKED, report_page + 72
        .set R_RD_LANDED,   report_page + 76
        .set R_RD_BLOCKED,  report_page + 80
        .set R_EXEC_LANDED, report_page + 84
        .set R_EXEC_BLOCKED, report_page + 88
        .set R_SIDT,        report_page + 92
        .set R_LIDT_LANDED, report_page + 96
        .set R_LIDT_BLOCKED, report_page + 100
        .set R_DB,          report_page + 104
        .set R_GREQ,        report_page + 108
        .set R_GREQ_FAILED, report_page + 112
        .set R_QREQ,        report_page + 116
        .set R_CR3_LANDED,  report_page + 120
        .set R_CR3_BLOCKED, report_page + 124
        .set R_LGDT_LANDED, report_page + 128
        .set R_LGDT_BLOCKED, report_page + 132
        .set R_SGDT,        report_page + 136
        .set R_LLDT_LANDED, report_page + 140
        .set R_LLDT_BLOCKED, report_page + 144
        .set R_SLDT,        report_page + 148
        .set R_LTR_LANDED,  report_page + 152
        .set R_LTR_BLOCKED, report_page + 156
        .set R_STR,         report_page + 160
        .set R_ACC,         report_page + 164
        .set R_ACC_WR_LANDED, report_page + 168
        .set R_ACC_WR_BLOCKED, report_page + 172
        .set R_BPREAD_OK,   report_page + 176
        .set R_BPREAD_BAD,  report_page + 180
