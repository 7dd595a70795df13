//! Giving memory back to the system once a burst of work is over (start-up, a reload, a large action).
//!
//! Two kinds of memory stay in an idle process's RSS after such a burst although nothing uses them:
//!
//! - heap the allocator keeps after it was freed (glibc keeps it in its arenas): `malloc_trim`;
//! - pages of the executable's code and constants that the burst ran or read. Start-up alone maps
//!   some 15 MiB of them (argument parsing, the configuration's parser, the SDK's set-up, TLS), while
//!   the idle scheduling loop runs from a few hundred KiB. They are unmapped with `MADV_DONTNEED`: they
//!   stay in the page cache, which the kernel reclaims like any cached file, and a later access maps them
//!   again from there (a minor fault, no I/O while they are cached).
//!
//! Only segments the program never writes are unmapped (its `PT_LOAD` segments without `PF_W`): for
//! such a private file mapping, dropping a page loses nothing, since the page is read back from the
//! file. The relocated read-only data (`PT_GNU_RELRO`) sits in the writable segment and is left alone,
//! and so are the heap, the stacks and the shared libraries.
//!
//! One consequence for debugging: a breakpoint or uprobe written into shiftd's code (gdb, `perf probe`,
//! bpftrace) lives in a private copy of its page, which the next release drops. Attach after start-up,
//! or expect to set it again after a reload or a large action.

/// What [`release`] gave back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Bytes of the executable's read-only segments that were unmapped (mapped or not before).
    pub code_bytes: usize,
}

/// Gives freed heap back to the system and unmaps the executable's code and constants (see the
/// module's documentation). Cheap (microseconds): called after start-up, after a reload and after a
/// large action, when nothing is in flight.
pub fn release() -> Released {
    trim_heap();
    Released {
        code_bytes: release_code_pages(),
    }
}

fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer; it only returns the allocator's own free pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How many malloc arenas the daemon's threads share (glibc's default is 8 per core).
const MALLOC_ARENAS: i32 = 1;

/// Has the daemon's threads share [`MALLOC_ARENAS`] malloc arena(s) instead of one per thread (up to
/// 8 per core). A batch's memory is allocated on whichever runtime thread polls it and freed on
/// another; with an arena per thread each arena keeps its own free but unreturnable pages, and at a
/// 1,000-account stop that came to about 6 MiB of the peak (and 5 MiB idle), measured. To be called
/// before the async runtime starts its threads (an arena, once a thread has it, stays its arena). An
/// operator's `MALLOC_ARENA_MAX` or `GLIBC_TUNABLES=glibc.malloc.arena_max=…` wins.
pub fn limit_arenas() {
    let tuned = std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
    if tuned {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes no pointer; M_ARENA_MAX only bounds the arenas created from now on.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
}

/// Unmaps the pages of the main executable's non-writable `PT_LOAD` segments; returns their size.
#[cfg(target_os = "linux")]
fn release_code_pages() -> usize {
    use std::ffi::{c_int, c_void};

    /// The page-aligned ranges to unmap, found in the main program's program headers.
    struct Found {
        ranges: Vec<(usize, usize)>,
    }

    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: dl_iterate_phdr passes a valid dl_phdr_info for the duration of the call, and
        // `data` is the `Found` given below, borrowed by nobody else meanwhile.
        let (info, found) = unsafe { (&*info, &mut *(data as *mut Found)) };
        if info.dlpi_phdr.is_null() {
            return 1;
        }
        // SAFETY: dlpi_phdr points at dlpi_phnum program headers of the loaded object.
        let headers =
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
        let page = page_size();
        for h in headers {
            if h.p_type != libc::PT_LOAD || h.p_flags & libc::PF_W != 0 {
                continue;
            }
            let start = info.dlpi_addr as usize + h.p_vaddr as usize;
            let end = start + h.p_memsz as usize;
            // Inward to whole pages: a page shared with another segment is never touched.
            let start = start.div_ceil(page) * page;
            let end = end / page * page;
            if end > start {
                found.ranges.push((start, end));
            }
        }
        // The main program is the first object listed: stop there.
        1
    }

    let mut found = Found { ranges: Vec::new() };
    // SAFETY: `visit` only reads the headers it is given and writes to `found`, which outlives the call.
    unsafe {
        libc::dl_iterate_phdr(Some(visit), &mut found as *mut Found as *mut c_void);
    }
    let mut released = 0;
    for (start, end) in found.ranges {
        // SAFETY: the range is inside a read-only, never-written private file mapping of the
        // executable; MADV_DONTNEED only drops its page table entries, and the next access reads
        // the same bytes from the file again.
        if unsafe { libc::madvise(start as *mut c_void, end - start, libc::MADV_DONTNEED) } == 0 {
            released += end - start;
        }
    }
    released
}

#[cfg(not(target_os = "linux"))]
fn release_code_pages() -> usize {
    0
}

#[cfg(target_os = "linux")]
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(1)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// `RssFile` of this process, in KiB.
    fn rss_file_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssFile:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn unmaps_the_code_pages_and_the_program_runs_on() {
        // Touch a good part of the test binary's code and constants first.
        let text = format!("{:?}", (1..1000).map(|i| i * 7).collect::<Vec<_>>());
        let parsed: toml::Table = toml::from_str("a = 1\n[b]\nc = \"d\"\n").unwrap();
        let before = rss_file_kib();
        let released = release();
        let after = rss_file_kib();
        assert!(
            released.code_bytes > 1 << 20,
            "the test binary has more than 1 MiB of code: {released:?}"
        );
        assert!(
            after < before,
            "RssFile went from {before} KiB to {after} KiB"
        );
        // The code runs on, reading its pages back from the file.
        let again: toml::Table = toml::from_str("a = 1\n[b]\nc = \"d\"\n").unwrap();
        assert_eq!(parsed, again);
        assert_eq!(
            text,
            format!("{:?}", (1..1000).map(|i| i * 7).collect::<Vec<_>>())
        );
    }
}
