#!/bin/sh
# Build the boot-sector test program: a 512-byte MBR that the BIOS runs.
# Usage: build.sh OUTPUT-DIR   ->  OUTPUT-DIR/boot-test.bin
set -eu

out=${1:?usage: build.sh OUTPUT-DIR}
src=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"

gcc -c -m32 -nostdlib -o "$out/boot-test.o" "$src/boot-test.S"
ld -m elf_i386 -nostdlib -static --build-id=none -Ttext 0x7c00 --oformat binary \
        -o "$out/boot-test.bin" "$out/boot-test.o"
rm -f "$out/boot-test.o"
test "$(wc -c < "$out/boot-test.bin")" -eq 512
