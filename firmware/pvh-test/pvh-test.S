/*
 * A minimal PVH guest for testing pyvmm's PVH loader and platform.
 *
 * Entered in 32-bit protected mode, paging off, %ebx = hvm_start_info.
 * Prints on COM1 whether the start_info magic is right, the command line
 * and the number of memory map entries, then powers the machine off
 * through ACPI PM1a_CNT (S5).  It runs a few thousand instructions at most.
 *
 * "action=X" on the command line makes it end another way instead, for the
 * tests of how pyvmm reports unexpected stops:
 *   action=t   triple fault (an exception with an empty IDT)
 *   action=h   cli; hlt forever (a CPU that can never run again)
 *   action=p   report a panic on the pvpanic port, then cli; hlt
 *   action=l   loop forever (only --timeout stops it), counting in spin_count
 *   action=c   count in spin_count to COUNT_END, reading COM1's scratch
 *              register at each step (an exit to the VMM: the count goes at
 *              the VMM's pace on any host), printing "count N" at every
 *              multiple of COUNT_STEP, then power off: what a snapshot
 *              restored mid-way must finish from where it was
 *   action=f   fill the RAM above 2 MiB (of the memory map's entry that
 *              holds 1 MiB) with 0x5a, then count as action=c: a guest
 *              whose memory is all data, for snapshot timings
 *
 * The constants must match pyvmm/layout.py (a unit test checks them).
 */

#define COM1_PORT           0x3f8
#define COM1_LSR            (COM1_PORT + 5)
#define COM1_SCR            (COM1_PORT + 7)
#define COUNT_STEP          1024
#define COUNT_END           (64 * COUNT_STEP)
#define LSR_THRE            0x20
#define ACPI_PM1A_CNT_BLK   0x604
#define ACPI_S5_SLP_TYP     5
#define SLP_EN              (1 << 13)
#define START_INFO_MAGIC    0x336ec578
#define PVPANIC_PORT        0x505
#define PVPANIC_PANICKED    1

/* hvm_start_info field offsets */
#define SI_VERSION          4
#define SI_CMDLINE          24
#define SI_MEMMAP_PADDR     40
#define SI_MEMMAP_ENTRIES   48
#define MEMMAP_ENTRY_SIZE   24                  /* addr u64, size u64, type u32, reserved u32 */
#define MEMMAP_TYPE_RAM     1
#define FILL_START          0x200000

#define XEN_ELFNOTE_PHYS32_ENTRY 18

        /* The note that makes this a PVH kernel: name "Xen", 32-bit entry. */
        .section .note.Xen, "a", @note
        .balign 4
        .long   4                       /* namesz */
        .long   4                       /* descsz */
        .long   XEN_ELFNOTE_PHYS32_ENTRY
        .asciz  "Xen"
        .long   pvh_start

        .section .note.GNU-stack, "", @progbits

        .text
        .code32
        .globl  pvh_start
pvh_start:
        cld
        movl    $stack_top, %esp

        cmpl    $START_INFO_MAGIC, (%ebx)
        jne     bad_magic

        movl    $msg_magic_ok, %esi
        call    puts

        movl    $msg_cmdline, %esi
        call    puts
        movl    SI_CMDLINE(%ebx), %esi  /* below 4 GiB: the high half is 0 */
        testl   %esi, %esi
        jz      1f
        call    puts
1:      movb    $'\n', %al
        call    putc

        movl    $msg_memmap, %esi
        call    puts
        xorl    %eax, %eax
        cmpl    $1, SI_VERSION(%ebx)    /* memmap fields exist from version 1 */
        jb      2f
        movl    SI_MEMMAP_ENTRIES(%ebx), %eax
2:      call    putdec
        movb    $'\n', %al
        call    putc

        call    find_action
        cmpb    $'t', %al
        je      triple_fault
        cmpb    $'h', %al
        je      halt_forever
        cmpb    $'p', %al
        je      report_panic
        cmpb    $'l', %al
        je      loop_forever
        cmpb    $'c', %al
        je      count_up
        cmpb    $'f', %al
        je      fill_memory
        jmp     poweroff

loop_forever:
        movl    $msg_loop, %esi
        call    puts
spin:
        incl    spin_count              /* a host test watches it stop while paused */
        pause
        jmp     spin

fill_memory:
        movl    SI_MEMMAP_PADDR(%ebx), %esi    /* below 4 GiB */
        movl    SI_MEMMAP_ENTRIES(%ebx), %ecx
fill_find:
        testl   %ecx, %ecx
        jz      count_up                        /* no such entry: nothing to fill */
        cmpl    $MEMMAP_TYPE_RAM, 16(%esi)
        jne     fill_next
        cmpl    $0x100000, (%esi)
        ja      fill_next
        movl    (%esi), %edx
        addl    8(%esi), %edx                   /* the entry's end */
        cmpl    $0x100000, %edx
        jbe     fill_next
        cmpl    $FILL_START, %edx
        jbe     count_up
        movl    $FILL_START, %edi
        movl    %edx, %ecx
        subl    %edi, %ecx
        shrl    $2, %ecx
        movl    $0x5a5a5a5a, %eax
        rep stosl
        movl    $msg_filled, %esi
        call    puts
        jmp     count_up
fill_next:
        addl    $MEMMAP_ENTRY_SIZE, %esi
        decl    %ecx
        jmp     fill_find

count_up:
        movl    $msg_counting, %esi
        call    puts
count_step:
        incl    spin_count
        movw    $COM1_SCR, %dx
        inb     %dx, %al                /* an exit to the VMM at every step */
        movl    spin_count, %eax
        testl   $(COUNT_STEP - 1), %eax
        jnz     count_step
        movl    $msg_count, %esi
        call    puts
        movl    spin_count, %eax
        call    putdec
        movb    $'\n', %al
        call    putc
        cmpl    $COUNT_END, spin_count
        jb      count_step
        movl    $msg_counted, %esi
        call    puts
        jmp     poweroff

triple_fault:
        movl    $msg_triple, %esi
        call    puts
        lidt    empty_idt
        ud2                             /* #UD -> #GP -> #DF -> shutdown */

report_panic:
        movl    $msg_panic, %esi
        call    puts
        movw    $PVPANIC_PORT, %dx
        movb    $PVPANIC_PANICKED, %al
        outb    %al, %dx
        /* fall through: a panicked kernel parks its CPU */

halt_forever:
        movl    $msg_halt, %esi
        call    puts
        cli
halted:
        hlt
        jmp     halted

bad_magic:
        movl    $msg_magic_bad, %esi
        call    puts

poweroff:
        movw    $ACPI_PM1A_CNT_BLK, %dx
        movw    $((ACPI_S5_SLP_TYP << 10) | SLP_EN), %ax
        outw    %ax, %dx
3:      hlt
        jmp     3b

/* The character after "action=" on the command line in %al, 0 if none. */
find_action:
        xorl    %eax, %eax
        movl    SI_CMDLINE(%ebx), %esi
        testl   %esi, %esi
        jz      no_action
try_here:
        movl    %esi, %edx              /* where this attempt started */
        movl    $action_key, %edi
compare:
        movb    (%edi), %al
        testb   %al, %al
        jz      found_action
        cmpb    (%esi), %al
        jne     try_next
        incl    %esi
        incl    %edi
        jmp     compare
try_next:
        movl    %edx, %esi
        cmpb    $0, (%esi)
        je      no_action
        incl    %esi
        jmp     try_here
found_action:
        movb    (%esi), %al
        ret
no_action:
        xorl    %eax, %eax
        ret

/* Send %al to COM1 once the transmitter holding register is empty. */
putc:
        pushl   %edx
        pushl   %eax
        movw    $COM1_LSR, %dx
4:      inb     %dx, %al
        testb   $LSR_THRE, %al
        jz      4b
        popl    %eax
        movw    $COM1_PORT, %dx
        outb    %al, %dx
        popl    %edx
        ret

/* Print the NUL-terminated string at %esi. */
puts:
        lodsb
        testb   %al, %al
        jz      5f
        call    putc
        jmp     puts
5:      ret

/* Print %eax in decimal. */
putdec:
        movl    $10, %ecx
        xorl    %edi, %edi              /* digits pushed */
6:      xorl    %edx, %edx
        divl    %ecx
        addb    $'0', %dl
        pushl   %edx
        incl    %edi
        testl   %eax, %eax
        jnz     6b
7:      popl    %eax
        call    putc
        decl    %edi
        jnz     7b
        ret

        .section .rodata
msg_magic_ok:   .asciz "pyvmm-pvh-test: magic ok\n"
msg_magic_bad:  .asciz "pyvmm-pvh-test: magic bad\n"
msg_cmdline:    .asciz "pyvmm-pvh-test: cmdline: "
msg_memmap:     .asciz "pyvmm-pvh-test: memmap entries: "
msg_triple:     .asciz "pyvmm-pvh-test: triple fault\n"
msg_panic:      .asciz "pyvmm-pvh-test: pvpanic\n"
msg_halt:       .asciz "pyvmm-pvh-test: halting with interrupts off\n"
msg_loop:       .asciz "pyvmm-pvh-test: looping forever\n"
msg_counting:   .asciz "pyvmm-pvh-test: counting\n"
msg_filled:     .asciz "pyvmm-pvh-test: memory filled\n"
msg_count:      .asciz "pyvmm-pvh-test: count "
msg_counted:    .asciz "pyvmm-pvh-test: counted, powering off\n"
action_key:     .asciz "action="
        .balign 8
empty_idt:      .word 0                 /* limit 0: no vector can be delivered */
                .long 0

        .bss
        .balign 16
stack:  .skip   512
stack_top:
        .globl  spin_count
spin_count: .skip 4
