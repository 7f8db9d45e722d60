# shellcheck shell=bash disable=SC2012,SC2034,SC2154
# The guest kernel for the VM tests (vm/boot-test.sh, vm/migrate.sh,
# vm/powercut.sh): Debian's cloud kernel, fetched once with `apt-get download`
# and cached with only the modules the guests need. Sourced by vm/lib.sh,
# which defines log, die, now and elapsed, and sets `cache` (the cache
# directory) and `kernel_pkg` (a package to pin, or empty). `vm_kernel_prepare` sets `kernel_pkg` and
# `kdir` (the package's cache directory: vmlinuz, config, modules/*.ko and
# modules/order, the load order, dependencies first). While it downloads,
# `fetch_tmp` names a directory the caller's exit trap should remove.
#
# Modules: virtio_pci + virtio_blk for the disks, virtio_net for the power-cut
# guest's network (QEMU user networking), ext4 + crc32c for the filesystems
# (the cloud kernel builds ext4 and crc32c in: built-ins are skipped).
# modules/wanted records what a cache entry was built for: an entry made for
# a shorter list (by an older script) is rebuilt.
VM_KERNEL_MODULES=(virtio_pci virtio_blk virtio_net crc32c_generic ext4)

vm_kernel_resolve_pkg() {
    local p
    p=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-cloud-amd64$/ { print $2; exit }')
    if [ -z "$p" ]; then
        p=$(apt-cache search --names-only '^linux-image-[0-9].*-cloud-amd64$' 2>/dev/null |
            awk '{ print $1 }' | sort -V | tail -n 1)
    fi
    printf '%s' "$p"
}

# vm_kernel_complete DIR: DIR is a finished cache entry with every module of
# VM_KERNEL_MODULES.
vm_kernel_complete() {
    local m
    [ -f "$1/.complete" ] && [ -f "$1/modules/wanted" ] || return 1
    for m in "${VM_KERNEL_MODULES[@]}"; do
        grep -qx "$m" "$1/modules/wanted" || return 1
    done
}

vm_kernel_prepare() {
    local p t tmp moddir m
    mkdir -p "$cache"
    if [ -z "$kernel_pkg" ]; then
        # The newest complete cache entry, if any.
        for p in $(cd "$cache" && ls -1d linux-image-*/.complete 2>/dev/null | sed 's#/.complete$##' | sort -V); do
            vm_kernel_complete "$cache/$p" && kernel_pkg=$p
        done
    fi
    if [ -z "$kernel_pkg" ]; then
        command -v apt-get >/dev/null 2>&1 || die "no cached kernel in $cache and no apt-get to fetch one"
        kernel_pkg=$(vm_kernel_resolve_pkg)
        if [ -z "$kernel_pkg" ]; then
            log "apt lists have no cloud kernel; running apt-get update"
            apt-get update -qq >/dev/null 2>&1 || true
            kernel_pkg=$(vm_kernel_resolve_pkg)
        fi
        [ -n "$kernel_pkg" ] || die "cannot find a linux-image-*-cloud-amd64 package (apt-cache search)"
    fi
    kdir=$cache/$kernel_pkg
    vm_kernel_complete "$kdir" && return 0

    log "fetching kernel package $kernel_pkg into $cache"
    t=$(now)
    tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
    fetch_tmp=$tmp
    vm_kernel_download() { (cd "$tmp" && apt-get download -o APT::Sandbox::User=root "$kernel_pkg" >download.log 2>&1); }
    if ! vm_kernel_download; then
        # Stale apt lists name a .deb the mirror no longer has: refresh, retry.
        log "apt-get download $kernel_pkg failed; running apt-get update and retrying"
        apt-get update -qq >/dev/null 2>&1 || true
        if [ -z "${VPOOL_VM_KERNEL_PKG:-}" ]; then
            kernel_pkg=$(vm_kernel_resolve_pkg)
            kdir=$cache/$kernel_pkg
        fi
        vm_kernel_download || { cat "$tmp/download.log" >&2; rm -rf "$tmp"; die "apt-get download $kernel_pkg failed"; }
    fi
    dpkg-deb -x "$tmp"/*.deb "$tmp/x" || { rm -rf "$tmp"; die "dpkg-deb -x failed"; }
    mkdir -p "$tmp/out/modules"
    cp "$tmp"/x/boot/vmlinuz-* "$tmp/out/vmlinuz"
    cp "$tmp"/x/boot/config-* "$tmp/out/config"
    moddir=$(ls -d "$tmp"/x/lib/modules/* | head -n 1)
    # Find a module file by name (module names use _; files may use -).
    find_ko() {
        local n=$1 alt=${1//_/-}
        find "$moddir/kernel" \( -name "$n.ko" -o -name "$n.ko.xz" -o -name "$n.ko.zst" \
            -o -name "$alt.ko" -o -name "$alt.ko.xz" -o -name "$alt.ko.zst" \) -print -quit
    }
    is_builtin() {
        grep -qE "/($1|${1//_/-})\.ko$" "$moddir/modules.builtin" 2>/dev/null
    }
    declare -A seen=()
    add_module() {
        local n=$1 f deps d
        [ -z "${seen[$n]:-}" ] || return 0
        seen[$n]=1
        f=$(find_ko "$n")
        if [ -z "$f" ]; then
            is_builtin "$n" && return 0
            die "kernel module $n is neither in $kernel_pkg nor built in"
        fi
        case "$f" in
            *.ko) cp "$f" "$tmp/out/modules/$n.ko" ;;
            *.ko.xz) xz -dc "$f" > "$tmp/out/modules/$n.ko" ;;
            *.ko.zst) zstd -qdc "$f" > "$tmp/out/modules/$n.ko" ;;
        esac
        deps=$(tr '\0' '\n' < "$tmp/out/modules/$n.ko" | sed -n 's/^depends=//p' | head -n 1)
        for d in ${deps//,/ }; do add_module "$d"; done
        echo "$n.ko" >> "$tmp/out/modules/order"
    }
    : > "$tmp/out/modules/order"
    for m in "${VM_KERNEL_MODULES[@]}"; do add_module "$m"; done
    printf '%s\n' "${VM_KERNEL_MODULES[@]}" > "$tmp/out/modules/wanted"
    rm -rf "$kdir"
    mv "$tmp/out" "$kdir"
    rm -rf "$tmp"
    fetch_tmp=
    touch "$kdir/.complete"
    log "kernel cached in $kdir ($(elapsed "$t") s)"
}
