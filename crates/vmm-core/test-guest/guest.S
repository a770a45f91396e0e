/*
 * Kiln's bare-metal tier-2 test guest.
 *
 * Boots exactly like a Linux vmlinux through PVH: the VMM finds the Xen
 * PHYS32_ENTRY ELF note, enters `pvh_start` in 32-bit protected mode with
 * paging off and %ebx pointing at hvm_start_info. Like Linux's PVH entry it
 * switches to its own identity page tables (RAM's first GiB and the 3-4 GiB MMIO
 * range, 2 MiB pages), enables long mode
 * and continues in 64-bit code. There it prints "READY\n" on the 8250 at
 * 0x3f8 and then does what `kiln.test=<action>` on the command line asks:
 *
 *   (none)  triple fault -> KVM_EXIT_SHUTDOWN (what `reboot=t` does in Linux;
 *           we raise #UD with an empty IDT: kvm-pvm cannot emulate the int3
 *           Linux uses there and reports KVM_EXIT_INTERNAL_ERROR instead)
 *   spin    loop forever in guest mode (tests host-side timeouts and kicks)
 *   halt    cli; hlt forever (vCPU blocked inside KVM_RUN)
 *   reset   write 0xFE to the i8042 command port 0x64
 *   info    print "cpus=<hex> memkib=<hex> cmdline=<...>" then triple fault
 *   count   print "C=<hex>\n" forever with a busy delay between lines; the counter
 *           lives in guest memory (snapshot tests: a restored guest continues it)
 *   fastcount  the same without the delay (snapshot benchmark: output never pauses)
 *   mmio    print "mmio magic=<hex> version=<hex> devid=<hex>" read from the first
 *           virtio-mmio window (0xd0000000), then triple fault
 *   outs    print "rep outsb OK\n" with one `rep outsb`, then triple fault
 *
 * Any failed check prints "ERR:<reason>" and triple-faults.
 */

	.equ COM1, 0x3f8
	.equ START_MAGIC, 0x336ec578
	.equ SI_CMDLINE, 24
	.equ SI_MEMMAP, 40
	.equ SI_MEMMAP_N, 48
	.equ MPTABLE, 0x9fc00

	.section .note.Xen, "a"
	.balign 4
	.long 4			/* namesz */
	.long 4			/* descsz */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long pvh_start

	.text
	.code32
	.globl pvh_start
pvh_start:
	cld
	mov	%ebx, %esi			/* hvm_start_info */
	mov	$stack_top, %esp
	cmpl	$START_MAGIC, (%esi)
	je	1f
	mov	$'M', %al			/* bad start_info magic: print 'M' and die */
	mov	$COM1, %dx
	outb	%al, %dx
	jmp	die32
1:
	/*
	 * The page tables are static data (like Linux's PVH entry): on kvm-pvm, 32-bit
	 * code with paging off is emulated instruction by instruction, so filling
	 * tables here took ~25 ms; long mode runs natively.
	 */
	/* PAE, CR3, EFER.LME, paging. */
	mov	%cr4, %eax
	or	$0x20, %eax
	mov	%eax, %cr4
	mov	$pml4, %eax
	mov	%eax, %cr3
	mov	$0xc0000080, %ecx
	rdmsr
	or	$0x100, %eax
	wrmsr
	mov	%cr0, %eax
	or	$0x80000001, %eax
	mov	%eax, %cr0
	lgdt	gdt_desc
	ljmp	$0x08, $long_mode

die32:
	lidt	zero_idt
	ud2
	jmp	die32

	.code64
long_mode:
	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	%esi, %r12d			/* r12 = hvm_start_info (zero-extended) */
	lea	msg_ready(%rip), %rdi
	call	puts

	/* Find "kiln.test=" in the command line; the byte after it picks the action. */
	mov	SI_CMDLINE(%r12), %rsi
	test	%rsi, %rsi
	jz	triple_fault
	mov	$2048, %rcx
4:	movzbl	(%rsi), %eax
	test	%al, %al
	jz	triple_fault			/* not found: default action */
	lea	key(%rip), %rdi
	mov	%rsi, %rdx
5:	movzbl	(%rdi), %eax
	test	%al, %al
	jz	found
	cmpb	%al, (%rdx)
	jne	6f
	inc	%rdi
	inc	%rdx
	jmp	5b
6:	inc	%rsi
	loop	4b
	jmp	triple_fault
found:
	movzbl	(%rdx), %eax
	cmp	$'s', %al
	je	spin
	cmp	$'h', %al
	je	halt
	cmp	$'r', %al
	je	reset
	cmp	$'i', %al
	je	info
	cmp	$'c', %al
	je	count
	cmp	$'f', %al
	je	fastcount
	cmp	$'m', %al
	je	mmio
	cmp	$'o', %al
	je	outs
	lea	msg_badaction(%rip), %rdi
	call	puts
	jmp	triple_fault

spin:
	jmp	spin

	/*
	 * count (snapshot tests): counter in memory, then wait COUNT_TSC TSC ticks (~0.5 ms at 2 GHz)
	 * before the next line. A time-based wait: on kvm-pvm a plain dec/jnz loop crawls.
	 */
	.equ COUNT_TSC, 0x100000
fastcount:
	xor	%r11d, %r11d
	jmp	count_line
count:
	mov	$COUNT_TSC, %r11d
count_line:
	lea	msg_count(%rip), %rdi
	call	puts
	mov	counter(%rip), %rax
	call	puthex
	lea	msg_nl(%rip), %rdi
	call	puts
	incq	counter(%rip)
	rdtsc
	shl	$32, %rdx
	or	%rax, %rdx
	mov	%rdx, %r10
1:	rdtsc
	shl	$32, %rdx
	or	%rax, %rdx
	sub	%r10, %rdx
	cmp	%r11, %rdx
	jb	1b
	jmp	count_line

halt:
	cli
	hlt
	jmp	halt

reset:
	mov	$0xfe, %al
	outb	%al, $0x64
	jmp	triple_fault

info:
	/* CPUs: walk the MP table's config entries, counting processors (type 0). */
	cmpl	$0x5f504d5f, MPTABLE		/* "_MP_" */
	jne	no_mp
	mov	MPTABLE + 4, %ebx		/* config table */
	cmpl	$0x504d4350, (%rbx)		/* "PCMP" */
	jne	no_mp
	movzwl	34(%rbx), %ecx			/* entry count */
	lea	44(%rbx), %rdx
	xor	%r13d, %r13d
7:	test	%ecx, %ecx
	jz	8f
	movzbl	(%rdx), %eax
	test	%al, %al
	jnz	71f
	inc	%r13d
	add	$20, %rdx
	dec	%ecx
	jmp	7b
71:	add	$8, %rdx
	dec	%ecx
	jmp	7b
8:	lea	msg_cpus(%rip), %rdi
	call	puts
	mov	%r13, %rax
	call	puthex
	/* RAM: sum of e820 type-1 entries in the PVH memmap, in KiB. */
	mov	SI_MEMMAP(%r12), %rdx
	mov	SI_MEMMAP_N(%r12), %ecx
	and	$0xff, %ecx			/* bounded */
	xor	%r13, %r13
9:	test	%ecx, %ecx
	jz	10f
	cmpl	$1, 16(%rdx)
	jne	91f
	add	8(%rdx), %r13
91:	add	$24, %rdx
	dec	%ecx
	jmp	9b
10:	lea	msg_mem(%rip), %rdi
	call	puts
	mov	%r13, %rax
	shr	$10, %rax
	call	puthex
	lea	msg_cmdline(%rip), %rdi
	call	puts
	mov	SI_CMDLINE(%r12), %rdi
	call	puts
	lea	msg_nl(%rip), %rdi
	call	puts
	jmp	triple_fault

mmio:
	/* Read the first virtio-mmio window's magic, version and device id. */
	mov	$0xd0000000, %ebx
	lea	msg_magic(%rip), %rdi
	call	puts
	mov	(%rbx), %eax
	call	puthex
	lea	msg_version(%rip), %rdi
	call	puts
	mov	4(%rbx), %eax
	call	puthex
	lea	msg_devid(%rip), %rdi
	call	puts
	mov	8(%rbx), %eax
	call	puthex
	lea	msg_nl(%rip), %rdi
	call	puts
	jmp	triple_fault

outs:
	/* String port I/O: one exit carries the whole string (KVM_EXIT_IO with count > 1). */
	lea	msg_outs(%rip), %rsi
	mov	$(msg_outs_end - msg_outs), %ecx
	mov	$COM1, %dx
	rep outsb
	jmp	triple_fault

no_mp:
	lea	msg_nomp(%rip), %rdi
	call	puts
	jmp	triple_fault

triple_fault:
	lidt	zero_idt(%rip)
	ud2
	jmp	triple_fault

/* puts: write the NUL-terminated string at %rdi (at most 4096 bytes). */
puts:
	mov	$COM1, %dx
	mov	$4096, %r8
1:	movzbl	(%rdi), %eax
	test	%al, %al
	jz	2f
	outb	%al, %dx
	inc	%rdi
	dec	%r8
	jnz	1b
2:	ret

/* puthex: write %rax in hex without leading zeros. */
puthex:
	mov	$COM1, %dx
	mov	$60, %cl
	xor	%r9d, %r9d			/* seen a non-zero digit */
1:	mov	%rax, %r8
	shr	%cl, %r8
	and	$0xf, %r8
	test	%cl, %cl
	jz	2f				/* always print the last digit */
	test	%r8, %r8
	jnz	2f
	test	%r9d, %r9d
	jz	3f
2:	mov	$1, %r9d
	push	%rax
	lea	hexdigits(%rip), %rax
	movzbl	(%rax,%r8), %eax
	outb	%al, %dx
	pop	%rax
3:	sub	$4, %cl
	jns	1b
	ret

	.section .rodata
	.balign 8
gdt:
	.quad	0
	.quad	0x00af9a000000ffff		/* 0x08: 64-bit code */
	.quad	0x00cf92000000ffff		/* 0x10: data */
gdt_desc:
	.word	gdt_desc - gdt - 1
	.long	gdt
	.balign 8
zero_idt:
	.word	0
	.quad	0
key:		.asciz "kiln.test="
hexdigits:	.ascii "0123456789abcdef"
msg_ready:	.asciz "READY\n"
msg_cpus:	.asciz "cpus="
msg_mem:	.asciz " memkib="
msg_cmdline:	.asciz " cmdline="
msg_nl:		.asciz "\n"
msg_count:	.asciz "C="
msg_outs:	.ascii "rep outsb OK\n"
msg_outs_end:
msg_magic:	.asciz "mmio magic="
msg_version:	.asciz " version="
msg_devid:	.asciz " devid="
msg_nomp:	.asciz "ERR:no MP table\n"
msg_badaction:	.asciz "ERR:unknown kiln.test action\n"

	/* Identity map of the first 1 GiB (RAM) and of 3-4 GiB (MMIO, uncached), 2 MiB pages. */
	.data
	.balign 4096
pml4:	.quad	pdpt + 3
	.fill	511, 8, 0
pdpt:	.quad	pd + 3
	.quad	0, 0
	.quad	pd_mmio + 3
	.fill	508, 8, 0
pd:
	.set	i, 0
	.rept	512
	.quad	(i << 21) | 0x83		/* present | rw | 2 MiB */
	.set	i, i + 1
	.endr
pd_mmio:
	.set	i, 0
	.rept	512
	.quad	(0xc0000000 + (i << 21)) | 0x9b	/* present | rw | PWT | PCD | 2 MiB */
	.set	i, i + 1
	.endr

	.bss
	.balign 8
counter:	.skip 8
	.balign 4096
stack:	.skip 4096
stack_top:
