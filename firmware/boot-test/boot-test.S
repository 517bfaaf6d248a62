/*
 * A boot sector for tests of firmware boots: loaded by the BIOS at 0:7C00
 * from the first disk, it reads that disk through INT 13h (the BIOS's disk
 * calls, which SeaBIOS carries out on the emulated IDE disk) one sector at
 * a time, checking each, and prints its progress through INT 10h (which
 * SeaBIOS copies to the serial console):
 *
 *   boot-test: started
 *   boot-test: count 256      every COUNT_STEP reads, up to COUNT_END;
 *                             and each time it writes the count into
 *                             sector MARK_LBA (INT 13h extended write)
 *   boot-test: done           once sector MARK_LBA reads back COUNT_END
 *   boot-test: bad read N     a read failed or a sector was not the one asked
 *
 * then halts. The disk it expects (tests/integration/test_snapshot_firmware_host.py
 * makes it): this sector at LBA 0, and sector k (1 <= k <= SPAN) beginning
 * with the 16-bit number k. Read k is of sector (k mod SPAN) + 1.
 *
 * A snapshot taken at any point and restored must go on to "done" with
 * every count in order: the in-flight IDE command, the firmware's state in
 * RAM and the vCPU in real mode all come back.
 */
#define COUNT_STEP  256
#define COUNT_END   (16 * COUNT_STEP)
#define SPAN        64
#define MARK_LBA    (SPAN + 8)
#define BUFFER      0x8000

        .code16
        .text
        .globl  _start
_start:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    $0x7c00, %sp
        sti
        movb    %dl, drive              /* the BIOS's number for the boot disk */
        movw    $msg_started, %si
        call    print

next_read:
        movw    count, %ax
        andw    $(SPAN - 1), %ax
        incw    %ax
        movw    %ax, dap_lba
        movb    $0x42, %ah              /* extended read */
        call    disk
        movw    BUFFER, %ax
        cmpw    dap_lba, %ax
        jne     bad_read
        incw    count
        testw   $(COUNT_STEP - 1), count
        jnz     1f
        movw    $msg_count, %si
        call    print
        movw    count, %ax
        call    print_number
        movw    $msg_newline, %si
        call    print
        movw    count, %ax              /* the mark: the count, written at MARK_LBA */
        movw    %ax, BUFFER
        movw    $MARK_LBA, dap_lba
        movb    $0x43, %ah              /* extended write */
        movb    $0, %al
        call    disk
1:      cmpw    $COUNT_END, count
        jne     next_read

        movw    $MARK_LBA, dap_lba      /* the last mark, read back */
        movw    $0, BUFFER
        movb    $0x42, %ah
        call    disk
        cmpw    $COUNT_END, BUFFER
        jne     bad_read
        movw    $msg_done, %si
        call    print
halt:   hlt
        jmp     halt

/* INT 13h function %ah on the disk address packet; a failure is a bad read. */
disk:
        movw    $dap, %si
        movb    drive, %dl
        int     $0x13
        jc      bad_read
        ret

bad_read:
        movw    $msg_bad, %si
        call    print
        movw    count, %ax
        call    print_number
        movw    $msg_newline, %si
        call    print
        jmp     halt

/* The NUL-terminated string at %si, through the BIOS's teletype output. */
print:
        lodsb
        testb   %al, %al
        jz      2f
        movb    $0x0e, %ah
        xorw    %bx, %bx
        int     $0x10
        jmp     print
2:      ret

/* %ax in decimal. */
print_number:
        movw    $10, %bx
        xorw    %cx, %cx
3:      xorw    %dx, %dx
        divw    %bx
        pushw   %dx
        incw    %cx
        testw   %ax, %ax
        jnz     3b
4:      popw    %ax
        addb    $'0', %al
        movb    $0x0e, %ah
        xorw    %bx, %bx
        int     $0x10
        loop    4b
        ret

        .balign 4
dap:    .byte   0x10, 0                 /* size, reserved */
        .word   1                       /* sectors */
        .word   BUFFER, 0               /* offset, segment */
dap_lba: .quad  0
count:  .word   0
drive:  .byte   0

msg_started:    .asciz "boot-test: started\r\n"
msg_count:      .asciz "boot-test: count "
msg_newline:    .asciz "\r\n"
msg_done:       .asciz "boot-test: done\r\n"
msg_bad:        .asciz "boot-test: bad read "

        .org    510
        .byte   0x55, 0xaa
