#!/usr/bin/env bash
# Mesa 25's lavapipe (a Vulkan device that runs on the CPU) for the device
# tests, unpacked into the cache and installed nowhere: Debian 12's own
# (Mesa 22.3) crashes now and then inside its queue thread (a double free
# there while the engine waits on a fence), which no setting of ggml's
# avoids. It comes from bookworm-backports with the libdrm it needs.
#
#   eval "$(bash scripts/lavapipe.sh)"
#
# prints the environment that points the Vulkan loader at it
# (VK_DRIVER_FILES, LD_LIBRARY_PATH). Where the system's lavapipe is Mesa 25
# or later already, or the system is not Debian 12, it prints nothing and
# the system's driver serves.
set -euo pipefail

log() { echo "lavapipe: $*" >&2; }

version="$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true)"
codename="$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")"
if [ "${version%%.*}" -ge 25 ] 2>/dev/null || [ "$codename" != bookworm ]; then
    log "using the system's Vulkan drivers (mesa-vulkan-drivers ${version:-not from dpkg}, ${codename:-unknown system})"
    exit 0
fi

dir="${ELPIS_CACHE_DIR:-$HOME/.cache/elpis}/lavapipe-bookworm-backports"
lib="$dir/usr/lib/x86_64-linux-gnu"
if [ ! -f "$dir/lvp.json" ]; then
    log "fetching Mesa's lavapipe from bookworm-backports into $dir"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/deb" "$tmp/x"
    printf 'deb http://deb.debian.org/debian bookworm main\ndeb http://deb.debian.org/debian bookworm-backports main\n' >"$tmp/sources.list"
    opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" update -qq >&2
    (cd "$tmp/deb" && apt-get "${opts[@]}" download -qq mesa-vulkan-drivers/bookworm-backports \
        libdrm2/bookworm-backports libdrm-amdgpu1/bookworm-backports >&2)
    for deb in "$tmp"/deb/*.deb; do dpkg -x "$deb" "$tmp/x"; done
    unpacked="$tmp/x/usr/lib/x86_64-linux-gnu"
    [ -f "$unpacked/libvulkan_lvp.so" ] || { log "the package holds no libvulkan_lvp.so"; exit 1; }
    missing="$(LD_LIBRARY_PATH="$unpacked" ldd "$unpacked/libvulkan_lvp.so" | grep 'not found' || true)"
    [ -z "$missing" ] || { log "libvulkan_lvp.so needs libraries this system lacks: $missing"; exit 1; }
    rm -rf "$dir" && mkdir -p "$lib"
    cp -a "$unpacked"/libvulkan_lvp.so "$unpacked"/libdrm*.so* "$lib/"
    # The package's own manifest, with the library's path made absolute.
    sed "s|\"library_path\": *\"[^\"]*\"|\"library_path\": \"$lib/libvulkan_lvp.so\"|" \
        "$tmp"/x/usr/share/vulkan/icd.d/lvp_icd*.json >"$dir/lvp.json.partial"
    grep -q "\"$lib/libvulkan_lvp.so\"" "$dir/lvp.json.partial" || { log "unexpected manifest: $(cat "$dir/lvp.json.partial")"; exit 1; }
    mv "$dir/lvp.json.partial" "$dir/lvp.json"
fi
printf 'export VK_DRIVER_FILES=%q\nexport LD_LIBRARY_PATH=%q\n' "$dir/lvp.json" "$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
