// SPDX-License-Identifier: GPL-2.0
/*
 * sgm_syscall NR [ARG]: make system call NR with ARG (decimal or 0x hex; default the
 * rootkit's SGM_MAGIC) as its first argument and print what it returned, in decimal.
 * sgm_syscall peek ADDR: print the 8 bytes of kernel memory at virtual address ADDR (hex),
 * read from /proc/kcore (its ELF program headers map addresses to file offsets), as a
 * little-endian number in hex: the guest's own view of a kernel word.
 * sgm_syscall int3: execute an int3 instruction (the kernel answers with SIGTRAP: exit
 * status 133 in a shell), which enters the kernel through IDT vector 3.
 * Freestanding (no libc): gcc -static -nostdlib -O2 -fno-stack-protector.
 */
typedef unsigned long u64;

static long sys(long nr, long a, long b, long c)
{
	long ret;

	asm volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a), "S"(b), "d"(c) : "rcx", "r11",
		     "memory");
	return ret;
}

static long parse(const char *s)
{
	u64 v = 0;
	int base = 10;

	if (s[0] == '0' && s[1] == 'x') {
		base = 16;
		s += 2;
	}
	for (; *s; s++) {
		int d = *s >= '0' && *s <= '9' ? *s - '0'
			: *s >= 'a' && *s <= 'f' ? *s - 'a' + 10 : 99;

		if (d >= base)
			return -1;
		v = v * base + d;
	}
	return (long)v;
}

static void out(const char *s, long n)
{
	sys(1, 1, (long)s, n);
}

static __attribute__((noreturn)) void leave(long status)
{
	sys(60, status, 0, 0);
	__builtin_unreachable();
}

static __attribute__((noreturn)) void die(const char *msg, long n)
{
	sys(1, 2, (long)msg, n);
	leave(2);
}

static long pread(long fd, void *buf, long n, u64 off)
{
	long ret;
	register long r10 asm("r10") = (long)off;

	asm volatile("syscall" : "=a"(ret) : "a"(17L), "D"(fd), "S"(buf), "d"(n), "r"(r10)
		     : "rcx", "r11", "memory");
	return ret;
}

static void peek(const char *arg)
{
	unsigned char hdr[64], ph[56];
	u64 addr = 0, phoff, word;
	long fd, i, n;
	char hex[19], *digits = "0123456789abcdef";

	for (arg += arg[0] == '0' && arg[1] == 'x' ? 2 : 0; *arg; arg++)
		addr = addr * 16 + (*arg <= '9' ? *arg - '0' : *arg - 'a' + 10);
	fd = sys(2, (long)"/proc/kcore", 0, 0);
	if (fd < 0 || pread(fd, hdr, 64, 0) != 64)
		die("cannot read /proc/kcore\n", 24);
	phoff = *(u64 *)(hdr + 0x20);
	n = *(unsigned short *)(hdr + 0x38);
	for (i = 0; i < n; i++) {
		u64 off, vaddr, size;

		if (pread(fd, ph, 56, phoff + i * 56) != 56)
			break;
		off = *(u64 *)(ph + 8);
		vaddr = *(u64 *)(ph + 16);
		size = *(u64 *)(ph + 32);
		if (*(unsigned int *)ph != 1 || addr < vaddr || addr - vaddr >= size)
			continue;
		if (pread(fd, &word, 8, off + (addr - vaddr)) != 8)
			break;
		hex[0] = '0';
		hex[1] = 'x';
		for (i = 0; i < 16; i++)
			hex[2 + i] = digits[(word >> (60 - 4 * i)) & 15];
		hex[18] = '\n';
		out(hex, 19);
		leave(0);
	}
	die("address not in /proc/kcore\n", 27);
}

void __attribute__((used)) sgm_main(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	char buf[32], *p = buf + sizeof(buf);
	long nr, ret;
	u64 mag;

	if (argc == 3 && argv[1][0] == 'p')
		peek(argv[2]);
	if (argc == 2 && argv[1][0] == 'i')
		asm volatile("int3");
	if (argc < 2 || (nr = parse(argv[1])) < 0)
		die("usage: sgm_syscall NR [ARG] | peek ADDR | int3\n", 47);
	ret = sys(nr, argc > 2 ? parse(argv[2]) : 0x53474d00L, 0, 0);
	*--p = '\n';
	mag = ret < 0 ? -(u64)ret : (u64)ret;
	do {
		*--p = '0' + mag % 10;
		mag /= 10;
	} while (mag);
	if (ret < 0)
		*--p = '-';
	out(p, buf + sizeof(buf) - p);
	leave(0);
}

asm(".globl _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall sgm_main\n\thlt\n");
