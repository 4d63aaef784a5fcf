//! Compile the XDP program of the AF_XDP driver (bpf/xsk_redirect.c) with clang when it is
//! installed. Without clang the crate still builds: `cfg(dva_xdp_built)` stays unset and
//! `AfXdp::open` reports that the driver was not built, so callers fall back to AF_PACKET.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dva_xdp_built)");
    println!("cargo::rerun-if-changed=bpf/xsk_redirect.c");
    println!("cargo::rerun-if-env-changed=CLANG");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("xsk_redirect.o");
    // Debian keeps asm/types.h under the multiarch directory, which `-target bpf` does not
    // search by itself.
    let multiarch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86_64-linux-gnu",
        Ok("aarch64") => "aarch64-linux-gnu",
        Ok("riscv64") => "riscv64-linux-gnu",
        _ => "",
    };
    let mut cmd = Command::new(&clang);
    cmd.args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"]);
    if !multiarch.is_empty() {
        cmd.arg(format!("-I/usr/include/{multiarch}"));
    }
    cmd.arg("-c").arg("bpf/xsk_redirect.c").arg("-o").arg(&obj);
    let result = cmd.output();
    if !matches!(result, Ok(ref o) if o.status.success()) {
        // Without clang the result would otherwise stick until the BPF source changes: a build
        // made before `apt-get install clang` would keep a binary with no AF_XDP. Watching the
        // directories clang would be found in reruns this script once it appears there.
        for dir in env::split_paths(&env::var_os("PATH").unwrap_or_default()) {
            if dir.is_absolute() && dir.is_dir() {
                println!("cargo::rerun-if-changed={}", dir.display());
            }
        }
        println!("cargo::rerun-if-env-changed=PATH");
    }
    match result {
        Ok(o) if o.status.success() => println!("cargo::rustc-cfg=dva_xdp_built"),
        Ok(o) => {
            println!(
            "cargo::warning=XDP program not built ({clang} failed: {}); the AF_XDP driver will \
             be unavailable at run time",
            String::from_utf8_lossy(&o.stderr).lines().next().unwrap_or("no output")
        )
        }
        Err(e) => println!(
            "cargo::warning=XDP program not built ({clang}: {e}); the AF_XDP driver will be \
             unavailable at run time (install clang and libbpf-dev)"
        ),
    }
}
