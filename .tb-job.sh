#!/bin/bash
# ad-hoc testbed job: the pause stress on the new code, then the gdb test with timestamps
export PYVMM_GUEST_ASSETS=$1
python3 scripts/stress-pause --cycles 60 --max-pause 5 --seed 1 2>&1 | tail -3
echo "== gdb test $(date +%T)"
PYVMM_REQUIRE_GUEST=1 python3 -u -m pytest -s -q -p no:cacheprovider --durations=0 tests/integration/test_gdb.py 2>&1 | while IFS= read -r l; do echo "$(date +%T) $l"; done
echo "== stats boot $(date +%T)"
python3 -m pyvmm run --kernel $1/vmlinuz --initrd $1/initramfs.cpio.gz --append console=hvc0 --vcpus 2 --memory 512M --no-reboot --timeout 300 --expect 'pyvmm-guest: init started' --stats --stats-json results/stats-boot.json > /dev/null 2> results/stats-boot.txt; echo "stats boot status $?"
