//! `info [-H] [-V]`: the daemon's environment.

use super::Client;
use anyhow::Result;
use isula_api::v1::InfoRequest;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print memory sizes in powers of 1000
    #[arg(short = 'H', long = "human-readable")]
    pub human: bool,
    /// Also print the daemon's own memory use
    #[arg(short = 'V', long = "verbose")]
    pub verbose: bool,
}

pub async fn run(client: &mut Client, args: Args) -> Result<()> {
    let i = client
        .info(InfoRequest {
            verbose: args.verbose,
        })
        .await?
        .into_inner();
    let size = |n: i64| {
        if args.human {
            isula_types::human_size(n.max(0) as u64)
        } else {
            n.to_string()
        }
    };
    let mem = i.mem_info.unwrap_or_default();
    println!("General:");
    println!("  MemTotal:     {}", size(mem.mem_total));
    println!("  MemFree:      {}", size(mem.mem_free));
    println!("  SwapTotal:    {}", size(mem.swap_total));
    println!("  SwapFree:     {}", size(mem.swap_free));
    println!("  OCI Runtime:  {}", i.oci_runtime);
    println!("  DataRoot:     {}", i.data_root);
    println!("  RunRoot:      {}", i.run_root);
    println!("  Builders:     {}", i.builder_num);
    println!("  Goroutines:   {}", i.go_routines);
    println!("  Experimental: {}", i.experimental);
    // fleet: what a fleet client places platform builds by.
    println!("  Native Platforms:   {}", i.native_platforms.join(", "));
    println!("  Emulated Platforms: {}", i.emulated_platforms.join(", "));
    let st = i.storage_info.unwrap_or_default();
    println!("Store:");
    println!("  Storage Driver:     {}", st.storage_driver);
    println!("  Backing Filesystem: {}", st.storage_backing_fs);
    println!(
        "  Build Cache:        {} ({} steps)",
        size(i.build_cache_size),
        i.build_cache_records
    );
    let reg = i.registry_info.unwrap_or_default();
    println!("Registry:");
    for (title, list) in [
        ("Search Registries", &reg.registries_search),
        ("Insecure Registries", &reg.registries_insecure),
        ("Blocked Registries", &reg.registries_block),
    ] {
        println!("  {title}:");
        for r in list {
            println!("    {r}");
        }
    }
    if args.verbose {
        let m = i.mem_stat.unwrap_or_default();
        let size = |n: u64| size(n as i64);
        println!("Runtime:");
        println!("  MemSys:       {}", size(m.mem_sys));
        println!("  HeapSys:      {}", size(m.heap_sys));
        println!("  HeapAlloc:    {}", size(m.heap_alloc));
        println!("  HeapInUse:    {}", size(m.heap_in_use));
        println!("  HeapIdle:     {}", size(m.heap_idle));
        println!("  HeapReleased: {}", size(m.heap_released));
        println!("  Threads:      {}", i.go_routines);
    }
    Ok(())
}
