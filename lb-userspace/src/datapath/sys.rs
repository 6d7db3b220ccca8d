//! The few system calls aya 0.14 does not make for lb: bpf(2) commands it does not expose,
//! statfs and mount for the pin folder, and mmap of BPF_F_MMAPABLE arrays (read and written
//! only through `ArrayMemory`'s checked accessors). Every `unsafe` of the data path is here.

use std::{io, path::Path, sync::Arc};

use aya::maps::MapData;

/// Whether `path` is on a bpf filesystem.
pub(crate) fn on_bpffs(path: &Path) -> io::Result<bool> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: statfs writes into the zeroed struct we own; c is a valid NUL-terminated string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type == libc::BPF_FS_MAGIC)
}

/// Mounts a bpffs at /sys/fs/bpf with mode 0700 (pins are root's business).
pub(crate) fn mount_bpffs() -> io::Result<()> {
    let src = c"bpf";
    let target = c"/sys/fs/bpf";
    let options = c"mode=0700";
    // SAFETY: all pointers are valid NUL-terminated strings; bpffs reads `options` as text.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The bytes of element 0 of the array map pinned at `pin`, whatever its value size (aya 0.14
/// reads only values of a type known at compile time).
pub(crate) fn read_first_value(pin: &Path) -> Option<Vec<u8>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    let map = MapData::from_pin(pin).ok()?;
    let size = map.info().ok()?.value_size() as usize;
    if size < 16 {
        return None;
    }
    let key = 0u32;
    let mut value = vec![0u8; size];
    // bpf_attr for BPF_MAP_LOOKUP_ELEM: map_fd (u32, padded), key, value, flags.
    let mut attr = [0u64; 16];
    attr[0] = map.fd().as_fd().as_raw_fd() as u32 as u64;
    attr[1] = &key as *const u32 as u64;
    attr[2] = value.as_mut_ptr() as u64;
    // SAFETY: attr names a valid map fd, a 4-byte key and a writable buffer of the map's value
    // size, all alive for the call; the kernel writes only `size` bytes into `value`.
    unsafe { bpf_syscall(BPF_MAP_LOOKUP_ELEM, &mut attr) }.ok()?;
    Some(value)
}

/// Calls bpf(2) with `attr` as its `union bpf_attr` (zero past what the command reads), for the
/// few commands aya 0.14 does not expose: the call's non-negative result (a descriptor for the
/// commands that make one), or the error.
///
/// # Safety
/// Every pointer `attr` holds must be valid for the command for the duration of the call:
/// readable where the kernel reads, writable for as many bytes as the command says it writes.
pub(crate) unsafe fn bpf_syscall(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: attr is a buffer the size of bpf_attr; what it points to is the caller's promise.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            size_of_val(attr) as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The head of the `bpf_link_info` of the link pinned at `pin` (type, id, prog_id, padding,
/// then for XDP the ifindex), read with BPF_OBJ_GET and BPF_OBJ_GET_INFO_BY_FD (aya 0.14 does
/// not expose the XDP part of a link's info: its interface).
pub(crate) fn link_info_head(pin: &Path) -> io::Result<[u32; 6]> {
    use std::os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    };
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd, file_flags: all others zero.
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: attr holds a valid NUL-terminated path, which outlives the call; the kernel only
    // reads it.
    let fd = unsafe { bpf_syscall(BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: the kernel just returned this descriptor, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // The head of bpf_link_info: type, id, prog_id, padding, then (XDP) ifindex. The kernel
    // fills at most info_len bytes.
    let mut info = [0u32; 6];
    let mut attr = [0u64; 16];
    attr[0] = (fd.as_raw_fd() as u32 as u64) | ((size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: attr names a valid fd and a writable buffer of info_len bytes, which outlives
    // the call; the kernel writes at most info_len bytes into it.
    unsafe { bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info)
}

/// Deletes `key` from the map `map` (BPF_MAP_DELETE_ELEM): aya 0.14 has no `remove` for an
/// array of maps, where deleting an element empties its slot.
pub(crate) fn map_delete(map: &MapData, key: u32) -> io::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    // bpf_attr for BPF_MAP_DELETE_ELEM: map_fd (u32), padding, key (u64 pointer).
    let mut attr = [0u64; 16];
    attr[0] = map.fd().as_fd().as_raw_fd() as u32 as u64;
    attr[1] = &key as *const u32 as u64;
    // SAFETY: attr names an open map fd and a key that outlives the call; the kernel only
    // reads both.
    unsafe { bpf_syscall(BPF_MAP_DELETE_ELEM, &mut attr) }.map(|_| ())
}

/// The value area of a BPF_F_MMAPABLE array, mapped into this process (unmapped on drop). It
/// is reached only through [`ArrayMemory::read_at`], [`ArrayMemory::write`] and
/// [`ArrayMemory::zero`]: whole, aligned, volatile accesses inside the bytes asked for (the
/// program may read or write the same memory meanwhile).
pub(crate) struct ArrayMemory {
    base: *mut libc::c_void,
    /// The length of the mapping (whole pages).
    len: usize,
    /// The bytes asked for: what the accessors may touch.
    bytes: usize,
    writable: bool,
}

// SAFETY: the mapping is shared memory owned by this value (unmapped on drop), valid whichever
// thread uses it, and reached only through volatile accesses.
unsafe impl Send for ArrayMemory {}

impl ArrayMemory {
    /// Maps the first `bytes` of `map`'s values (rounded up to pages), shared.
    pub(crate) fn map(map: &MapData, bytes: usize, writable: bool) -> io::Result<ArrayMemory> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = bytes.max(1).div_ceil(page) * page;
        let fd = map.fd().as_fd().as_raw_fd();
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: mapping `len` bytes of the map's value area (the kernel sized it for every
        // element, rounded up to pages), shared; the result is checked below.
        let base = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ArrayMemory {
            base,
            len,
            bytes,
            writable,
        })
    }

    /// Where a `T` at byte `offset` is: inside the bytes asked for and aligned, else a panic
    /// (a caller's bug, never the data's).
    fn place<T>(&self, offset: usize) -> *mut T {
        assert!(
            offset + size_of::<T>() <= self.bytes,
            "{} bytes at offset {offset} lie past the {} bytes mapped",
            size_of::<T>(),
            self.bytes
        );
        let at = self.base.cast::<u8>().wrapping_add(offset).cast::<T>();
        assert!(
            at.is_aligned(),
            "offset {offset} is not aligned for its type"
        );
        at
    }

    /// The `T` at byte `offset`, read whole.
    pub(crate) fn read_at<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: `place` checked that the value lies inside the mapping and is aligned; any
        // bit pattern is a valid `T` for the plain-data types read here.
        unsafe { self.place::<T>(offset).read_volatile() }
    }

    /// Element `i` of the memory seen as an array of `T`, read whole.
    pub(crate) fn read<T: Copy>(&self, i: usize) -> T {
        self.read_at(i * size_of::<T>())
    }

    /// Writes a `T` at byte `offset`, whole.
    pub(crate) fn write_at<T: Copy>(&self, offset: usize, value: T) {
        assert!(self.writable, "the memory was mapped read-only");
        // SAFETY: `place` checked that the value lies inside the mapping and is aligned; the
        // mapping is writable.
        unsafe { self.place::<T>(offset).write_volatile(value) }
    }

    /// Writes element `i` of the memory seen as an array of `T`, whole.
    pub(crate) fn write<T: Copy>(&self, i: usize, value: T) {
        assert!(self.writable, "the memory was mapped read-only");
        // SAFETY: `place` checked that the value lies inside the mapping and is aligned; the
        // mapping is writable.
        unsafe { self.place::<T>(i * size_of::<T>()).write_volatile(value) }
    }

    #[cfg(any(test, feature = "test-hooks"))]
    /// Zeroes the bytes asked for. The program may write meanwhile: a byte-wise zeroing races
    /// with it harmlessly for the tables zeroed here (a torn entry belongs to no flow).
    pub(crate) fn zero(&self) {
        assert!(self.writable, "the memory was mapped read-only");
        // SAFETY: the first `bytes` of the writable mapping are ours to write.
        unsafe { std::ptr::write_bytes(self.base.cast::<u8>(), 0, self.bytes) }
    }
}

impl Drop for ArrayMemory {
    fn drop(&mut self) {
        // SAFETY: `base` and `len` are exactly what mmap returned and was given.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Writes `values` into a new BPF_F_MMAPABLE array of u64 through its memory: one copy instead
/// of a syscall per element (a 65,537-slot table: ~60 ms of syscalls otherwise).
pub(crate) fn fill_mmapable_array(map: &MapData, values: &[u64]) -> io::Result<()> {
    let memory = ArrayMemory::map(map, std::mem::size_of_val(values), true)?;
    // SAFETY: the mapping holds `values.len()` 8-byte elements; the map is new and not yet
    // visible to the program, so nothing else writes it.
    unsafe {
        std::ptr::copy_nonoverlapping(values.as_ptr(), memory.base.cast::<u64>(), values.len())
    };
    Ok(())
}

/// The first `len` u64 values of a BPF_F_MMAPABLE array, read through its memory.
pub(crate) fn read_mmapable_array(map: &MapData, len: usize) -> io::Result<Arc<[u64]>> {
    let memory = ArrayMemory::map(map, len * 8, false)?;
    Ok((0..len).map(|i| memory.read::<u64>(i)).collect())
}

// ---- probes of the kernel's features (`kernel`) ----

/// Writes the `index`th u32 of a `union bpf_attr` held as u64 words (native byte order).
fn put_u32(attr: &mut [u64; 16], index: usize, value: u32) {
    let shift = if cfg!(target_endian = "little") {
        (index % 2) * 32
    } else {
        (1 - index % 2) * 32
    };
    let word = &mut attr[index / 2];
    *word = (*word & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
}

/// A new map (BPF_MAP_CREATE) for a probe, with no BTF and no name; closed when dropped.
pub(crate) fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
    inner_map: Option<std::os::fd::BorrowedFd<'_>>,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const BPF_MAP_CREATE: libc::c_long = 0;
    // bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, map_flags,
    // inner_map_fd (u32 each); the rest zero.
    let mut attr = [0u64; 16];
    put_u32(&mut attr, 0, map_type);
    put_u32(&mut attr, 1, key_size);
    put_u32(&mut attr, 2, value_size);
    put_u32(&mut attr, 3, max_entries);
    put_u32(&mut attr, 4, flags);
    put_u32(
        &mut attr,
        5,
        inner_map.map_or(0, |fd| fd.as_raw_fd() as u32),
    );
    // SAFETY: the attr holds no pointers; the inner map's descriptor is borrowed for the call.
    let fd = unsafe { bpf_syscall(BPF_MAP_CREATE, &mut attr) }?;
    // SAFETY: BPF_MAP_CREATE returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sets `key` to `value` in `map` (BPF_MAP_UPDATE_ELEM, BPF_ANY); both must have the map's
/// key and value sizes.
pub(crate) fn map_update(
    map: std::os::fd::BorrowedFd<'_>,
    key: &[u8],
    value: &[u8],
) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    // bpf_attr for BPF_MAP_UPDATE_ELEM: map_fd (u32, padded), key, value, flags (0: BPF_ANY).
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u32 as u64;
    attr[1] = key.as_ptr() as u64;
    attr[2] = value.as_ptr() as u64;
    // SAFETY: key and value are readable for the map's key and value sizes (the caller's
    // promise, checked by the kernel against the map it created); the kernel only reads them.
    unsafe { bpf_syscall(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(|_| ())
}

/// Maps the first page of `map`'s values read-only and unmaps it: whether the kernel lets a
/// BPF_F_MMAPABLE array be mapped.
pub(crate) fn mmap_read_only(map: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    // SAFETY: a new read-only shared mapping of one page; the result is checked, and the
    // mapping is removed right away, never read.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ,
            libc::MAP_SHARED,
            map.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: exactly the mapping made above.
    unsafe { libc::munmap(base, page) };
    Ok(())
}

/// BPF_LINK_CREATE with a program descriptor that names no program: the kernel's answer tells
/// whether it knows `attach_type` for links (an error naming the descriptor, EBADF) or not
/// (EINVAL). Never creates anything.
pub(crate) fn link_create_without_program(attach_type: u32) -> io::Error {
    const BPF_LINK_CREATE: libc::c_long = 28;
    // bpf_attr for BPF_LINK_CREATE: prog_fd, target_fd (or ifindex), attach_type, flags.
    let mut attr = [0u64; 16];
    put_u32(&mut attr, 0, u32::MAX);
    put_u32(&mut attr, 1, 0);
    put_u32(&mut attr, 2, attach_type);
    // SAFETY: the attr holds no pointers.
    match unsafe { bpf_syscall(BPF_LINK_CREATE, &mut attr) } {
        Err(e) => e,
        Ok(fd) => {
            // Cannot happen (no program); close whatever came back rather than leak it.
            // SAFETY: a descriptor the kernel just returned and nothing else owns.
            drop(unsafe {
                <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32)
            });
            io::Error::other("BPF_LINK_CREATE succeeded without a program")
        }
    }
}

/// RLIMIT_MEMLOCK: (soft, hard), RLIM_INFINITY for unlimited.
pub(crate) fn memlock_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Sets RLIMIT_MEMLOCK's soft limit (at most the hard one, so no privilege is needed).
pub(crate) fn set_memlock_soft_limit(soft: u64) -> io::Result<()> {
    let (_, hard) = memlock_limit()?;
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The running kernel's release (`uname -r`).
pub(crate) fn kernel_release() -> io::Result<String> {
    // SAFETY: uname writes into the zeroed struct we own.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut name) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: uname fills `release` with a NUL-terminated string.
    let release = unsafe { std::ffi::CStr::from_ptr(name.release.as_ptr()) };
    Ok(release.to_string_lossy().into_owned())
}
