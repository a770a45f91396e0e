#!/bin/busybox sh
# /init of the harness's L1 VM (packed by xtask/src/harness/assets.rs; see docs/HARNESS.md).
#
# Loads the modules listed in /modules.load (kvm-amd with nested=1 npt=1, the 9p and virtio
# stack), mounts the host's root (read-only), the scratch share and the writable shares over
# virtio-9p, builds a chroot of the host root, runs /scratch/run.sh inside it with stdout and
# stderr on the virtio serial ports named kiln.stdout / kiln.stderr, writes the exit status to
# /scratch/status and powers off. Marker lines on the console (ttyS0) tell the host the phases:
#   KILN-HARNESS-INIT, KILN-HARNESS-START, KILN-HARNESS-END <status>, KILN-HARNESS-FAIL <why>.
# It ends L1 with `reboot -f`, which QEMU's -no-reboot turns into its exit.

/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "KILN-HARNESS-INIT"
phase() { echo "kiln-harness: $1 at uptime $(cut -d' ' -f1 /proc/uptime)"; }

fail() {
    echo "KILN-HARNESS-FAIL $*"
    reboot -f
    sleep 10
    exit 1
}

NINEP="trans=virtio,version=9p2000.L,msize=262144"

while read -r mod args; do
    [ -n "$mod" ] || continue
    # shellcheck disable=SC2086 # module parameters are separate words on purpose
    insmod "/lib/modules/$mod.ko" $args || fail "insmod $mod $args failed"
done < /modules.load

phase "modules loaded"
[ -c /dev/kvm ] || fail "/dev/kvm is missing after loading kvm-amd (does the CPU model have svm?)"

mount -t 9p -o "$NINEP,cache=none" scratch /scratch || fail "mounting the scratch share failed"
mount -t 9p -o "$NINEP,ro,cache=loose" hostroot /newroot || fail "mounting the host root failed"
# A second view of the host root without the mounts stacked on /newroot below.
mount -o bind /newroot /hostview || fail "bind-mounting the host root view failed"

R=/newroot
mount -t proc proc "$R/proc" || fail "mounting /proc failed"
mount -t sysfs sysfs "$R/sys" || fail "mounting /sys failed"
mount -t devtmpfs devtmpfs "$R/dev" || fail "mounting /dev failed"
mkdir -p "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$R/dev/pts"
mount -t tmpfs -o mode=1777 tmpfs "$R/dev/shm"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp" || fail "mounting /tmp failed"
mount -t tmpfs -o mode=0755 tmpfs "$R/run" || fail "mounting /run failed"

# Host paths hidden by the tmpfs mounts above (e.g. a checkout under /tmp) come back read-only;
# then the writable shares are mounted at their host paths.
while read -r kind a b; do
    case "$kind" in
    ro)
        mkdir -p "$R$a" && mount -o bind "/hostview$a" "$R$a" || fail "bind-mounting $a failed"
        ;;
    rw)
        mkdir -p "$R$b" && mount -t 9p -o "$NINEP,cache=mmap" "$a" "$R$b" \
            || fail "mounting share $a at $b failed"
        ;;
    esac
done < /scratch/mounts

port() {
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && { echo "/dev/${p##*/}"; return 0; }
    done
    return 1
}
OUT=$(port kiln.stdout) || fail "virtio serial port kiln.stdout not found"
ERR=$(port kiln.stderr) || fail "virtio serial port kiln.stderr not found"
TICK=$(port kiln.tick) || fail "virtio serial port kiln.tick not found"
# The host sends a byte a second: each is an interrupt that re-raises any interrupt QEMU's TCG
# lost (docs/HARNESS.md, "When L1 stalls"); they are discarded.
cat "$TICK" > /dev/null &

# Loopback up: tier-4 tests start servers (a registry, HTTP origins) on L1's 127.0.0.1.
ip link set lo up || fail "bringing up lo failed"

phase "mounts done"
mkdir -p "$R/run/kiln-harness"
cp /scratch/run.sh "$R/run/kiln-harness/run.sh" || fail "copying run.sh failed"

echo "KILN-HARNESS-START"
chroot "$R" /bin/sh /run/kiln-harness/run.sh < /dev/null > "$OUT" 2> "$ERR"
status=$?
echo "$status" > /scratch/status
sync
echo "KILN-HARNESS-END $status"
reboot -f
sleep 10
