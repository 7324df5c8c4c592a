// SPDX-License-Identifier: GPL-2.0
/*
 * The arm64 lab's in-guest attacker (tests/lab/lab_arm64.sh): a kernel thread that, every round,
 * does the attacks of examples/policies/linux-arm64-integrity.vmi and checks from inside the guest
 * whether each took effect:
 *
 *   - writes slot 244 of sys_call_table (an arch-specific gap: sys_ni_syscall) through its own
 *     writable vmap alias of the table's frame, reads it back, and puts it back at once if it landed;
 *   - writes the last byte of that frame with its own value (past the 451-entry table's end, on the
 *     watched page: a write the policy allows, answered by relaxing the page);
 *   - issues an SMC with x0 = SMCCC_VERSION: Xen answers it itself (x0 becomes the version), while
 *     under the enforcer the monitor sees it and the answer skips it (x0 unchanged);
 *   - calls commit_creds(prepare_creds()), the policy's execute breakpoint, and first reads the 4
 *     bytes at commit_creds: an injected SMC breakpoint is visible to the guest's reads (the caveat
 *     the compiler warns about), counted as creds_smc_seen;
 *   - writes its own buffer (benign);
 *   - reads the first instruction of its probe page and then calls it (the split-TLB experiment: an
 *     execute watch on a page the guest also reads; tests/lab/dom0_check_arm64.py watches the page's
 *     frame, which the module prints at load as "policyc-lab-arm64 probe va=... pfn=..."). The probe
 *     page holds only `bti c; mov x0, #42; ret`, alone on its page. Each call is counted, and those
 *     in a round whose table write was refused (so: under the enforcer) separately.
 *
 * The counters go to the console every 10 rounds as one "policyc-lab-arm64 ..." line (hvc0, which
 * xenconsoled logs in dom0: tests/lab/dom0_check_arm64.py reads the last one).
 */
#include <linux/module.h>
#include <linux/kthread.h>
#include <linux/delay.h>
#include <linux/vmalloc.h>
#include <linux/mm.h>
#include <linux/cred.h>
#include <linux/slab.h>
#include <asm/memory.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("policyc arm64 lab: in-guest attacks and their outcome, seen from the guest");

/* link-time addresses from the System.map the policy uses; the slide comes from commit_creds itself
 * (Debian's kernel has no data symbols in /proc/kallsyms) */
static unsigned long table_link, creds_link, table_addr, creds_addr;
module_param(table_link, ulong, 0444);
module_param(creds_link, ulong, 0444);
static unsigned int slot = 244;
module_param(slot, uint, 0444);
static unsigned int period_ms = 10;
module_param(period_ms, uint, 0444);

#define SMC_INSN 0xd4000003u	/* smc #0 */
#define SMCCC_VERSION 0x80000000ul

#define PROBE_MOV_X0_42 0xd2800540u	/* mov x0, #42 */

/* The probe: a page of its own in the module's text (module memory is page aligned, and the section
 * asks for 4096), so that watching its frame watches nothing else. */
asm(".pushsection .text.policyc_probe, \"ax\"\n"
    ".balign 4096\n"
    ".globl policyc_probe_fn\n"
    "policyc_probe_fn:\n"
    "	hint #34\n"			/* bti c (a NOP without BTI) */
    "	mov x0, #42\n"
    "	ret\n"
    ".balign 4096\n"
    ".popsection\n");
unsigned long policyc_probe_fn(void);

static struct {
	u64 round, sct_landed, sct_blocked, benign_landed, benign_blocked, smc_answered, smc_skipped;
	u64 creds, creds_smc_seen, collateral;
	u64 probe_reads, probe_read_wrong, probe_execs, probe_exec_wrong, probe_execs_enforced, probe_reads_enforced;
} c;
static struct task_struct *worker;
static u8 *alias;		/* the writable alias of the frame holding the slot */
static u64 *entry;		/* the slot, through the alias */
static u64 *own;

static unsigned long smc_version(void)
{
	register unsigned long x0 asm("x0") = SMCCC_VERSION;
	asm volatile("smc #0" : "+r"(x0) : : "x1", "x2", "x3", "memory");
	return x0;
}

static void one_round(void)
{
	u64 old = READ_ONCE(*entry), bogus = old ^ 0x10;
	u8 *last = alias + PAGE_SIZE - 1, b;
	unsigned long flags, v;
	u32 first;
	bool refused;

	local_irq_save(flags);
	WRITE_ONCE(*entry, bogus);
	refused = READ_ONCE(*entry) != bogus;
	if (!refused) {
		WRITE_ONCE(*entry, old);
		c.sct_landed++;
	} else {
		c.sct_blocked++;
	}
	local_irq_restore(flags);

	b = READ_ONCE(*last);
	WRITE_ONCE(*last, b);
	c.collateral++;

	v = smc_version();
	if (v == SMCCC_VERSION)
		c.smc_skipped++;
	else
		c.smc_answered++;

	first = READ_ONCE(*(u32 *)creds_addr);
	if (first == SMC_INSN)
		c.creds_smc_seen++;
	commit_creds(prepare_creds());
	c.creds++;

	/* the probe page: read its first instruction, then execute it */
	if (READ_ONCE(*(u32 *)((unsigned long)policyc_probe_fn + 4)) == PROBE_MOV_X0_42)
		c.probe_reads++;
	else
		c.probe_read_wrong++;
	c.probe_reads_enforced += refused;
	if (policyc_probe_fn() == 42)
		c.probe_execs++;
	else
		c.probe_exec_wrong++;
	c.probe_execs_enforced += refused;

	WRITE_ONCE(own[c.round & 7], c.round);
	if (READ_ONCE(own[c.round & 7]) == c.round)
		c.benign_landed++;
	else
		c.benign_blocked++;
	c.round++;
}

static int attack_loop(void *unused)
{
	while (!kthread_should_stop()) {
		one_round();
		if (c.round % 10 == 0)
			pr_notice("policyc-lab-arm64 round=%llu sct_landed=%llu sct_blocked=%llu benign_landed=%llu "
				"benign_blocked=%llu smc_answered=%llu smc_skipped=%llu creds=%llu creds_smc_seen=%llu "
				"collateral=%llu probe_reads=%llu probe_read_wrong=%llu probe_execs=%llu "
				"probe_exec_wrong=%llu probe_reads_enforced=%llu probe_execs_enforced=%llu\n",
				c.round, c.sct_landed, c.sct_blocked, c.benign_landed,
				c.benign_blocked, c.smc_answered, c.smc_skipped, c.creds, c.creds_smc_seen,
				c.collateral, c.probe_reads, c.probe_read_wrong, c.probe_execs, c.probe_exec_wrong,
				c.probe_reads_enforced, c.probe_execs_enforced);
		msleep(period_ms);
	}
	return 0;
}

static int __init lab_init(void)
{
	struct page *page;
	unsigned long slot_addr;

	if ((unsigned long)policyc_probe_fn & ~PAGE_MASK) {
		pr_err("policyc-lab-arm64: the probe is not alone at a page start (%px)\n", policyc_probe_fn);
		return -EINVAL;
	}
	creds_addr = (unsigned long)&commit_creds;
	table_addr = table_link + (creds_addr - creds_link);
	slot_addr = table_addr + slot * sizeof(u64);
	if (!table_link || !creds_link || (slot_addr & ~PAGE_MASK) + sizeof(u64) > PAGE_SIZE - 8) {
		pr_err("policyc-lab-arm64: table_link= and creds_link= are needed\n");
		return -EINVAL;
	}
	page = phys_to_page(__pa_symbol(slot_addr & PAGE_MASK));
	alias = vmap(&page, 1, VM_MAP, PAGE_KERNEL);
	entry = (u64 *)(alias + (slot_addr & ~PAGE_MASK));
	own = kzalloc(PAGE_SIZE, GFP_KERNEL);
	if (!alias || !own)
		return -ENOMEM;
	pr_notice("policyc-lab-arm64 start table=%lx creds=%lx first=%08x\n", table_addr, creds_addr,
		*(u32 *)creds_addr);
	pr_notice("policyc-lab-arm64 probe va=%px pfn=%lx\n", policyc_probe_fn,
		vmalloc_to_pfn((void *)policyc_probe_fn));
	worker = kthread_run(attack_loop, NULL, "policyc_lab");
	return IS_ERR(worker) ? PTR_ERR(worker) : 0;
}

static void __exit lab_exit(void)
{
	kthread_stop(worker);
	vunmap(alias);
	kfree(own);
}

module_init(lab_init);
module_exit(lab_exit);
