#!/bin/sh
# Build the PVH test kernel in two containers: ELF64, and ELF32 with
# e_machine EM_X86_64 (the form some PVH kernels ship in).
# Usage: build.sh OUTPUT-DIR   ->  OUTPUT-DIR/pvh-test.elf64, pvh-test.elf32
set -eu

out=${1:?usage: build.sh OUTPUT-DIR}
src=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"

gcc -c -m64 -nostdlib -o "$out/pvh-test.o" "$src/pvh-test.S"
ld -m elf_x86_64 -nostdlib -static --build-id=none -T "$src/pvh-test.ld" \
        -o "$out/pvh-test.elf64" "$out/pvh-test.o"
objcopy -O elf32-x86-64 "$out/pvh-test.elf64" "$out/pvh-test.elf32"
rm -f "$out/pvh-test.o"
