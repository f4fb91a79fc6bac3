//! Page-aligned buffers: bounce buffers for O_DIRECT, which rejects
//! unaligned memory, and the server's request and reply buffers.
//!
//! From `MAP_MIN` up a buffer is its own anonymous mapping, unmapped when
//! dropped, so its memory goes back to the kernel at once. Through malloc
//! it stayed in the freeing thread's arena: with buffers of 4 KiB–4 MiB
//! freed on readers, pool threads and flushers, one pass of the benchmark
//! rows left the process at 170 MiB while no row alone needed 50
//! (docs/PERFORMANCE.md §13, §14).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    mapped: bool,
}

// The buffer is uniquely owned plain memory.
unsafe impl Send for AlignedBuf {}

/// Smallest buffer that gets a mapping of its own (glibc's own default
/// mmap threshold, before it starts raising it).
const MAP_MIN: usize = 128 * 1024;

impl AlignedBuf {
    pub const ALIGN: usize = 4096;

    pub fn zeroed(len: usize) -> AlignedBuf {
        let len = len.max(1);
        if len >= MAP_MIN {
            return AlignedBuf::mapped(len);
        }
        let layout = Self::layout(len);
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else { std::alloc::handle_alloc_error(layout) };
        AlignedBuf { ptr, len, mapped: false }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, Self::ALIGN).expect("valid layout")
    }

    /// A fresh anonymous mapping: zeroed and page-aligned by the kernel.
    fn mapped(len: usize) -> AlignedBuf {
        // SAFETY: a new private anonymous mapping touches no existing memory.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        // Out of address space or map count: as any failed allocation.
        let ptr = (ptr != libc::MAP_FAILED).then(|| NonNull::new(ptr.cast::<u8>())).flatten();
        let Some(ptr) = ptr else { std::alloc::handle_alloc_error(Self::layout(len)) };
        AlignedBuf { ptr, len, mapped: true }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: mapped with this length in `mapped`, and unmapped once.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        } else {
            // SAFETY: allocated with this layout in `zeroed`.
            unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_mapped_buffers_are_zeroed_aligned_and_writable() {
        for len in [0, 1, 4096, MAP_MIN - 1, MAP_MIN, (4 << 20) + 5] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_slice().len(), len.max(1));
            assert_eq!(b.as_slice().as_ptr() as usize % AlignedBuf::ALIGN, 0, "len {len}");
            assert!(b.as_slice().iter().all(|&x| x == 0), "len {len}");
            b.as_mut_slice().fill(0xa5);
            assert!(b.as_slice().iter().all(|&x| x == 0xa5));
        }
    }
}
