//! The process's file-descriptor limit: raised to its hard limit at start, and the share of it
//! that HTTP connections may take.
//!
//! Every client connection is a descriptor, and so is every log segment, checkpoint file and
//! spill file the pipeline opens. A process at its limit fails wherever the next `open` happens
//! to be, usually in the pipeline, whose actors then fail with "Too many open files" until the
//! supervisor gives up. So the limit is raised as far as the OS allows, and the HTTP server
//! takes at most half of it.

// getrlimit and setrlimit have no safe wrapper in std.
#![allow(unsafe_code)]

/// The limit after [`raise`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FdLimit {
    pub(crate) soft: u64,
    pub(crate) hard: u64,
    /// The soft limit before, when it was raised.
    pub(crate) raised_from: Option<u64>,
}

/// Raises the soft limit on open files to the hard limit (capped at what a process may ask
/// for), and returns the limit in force.
pub(crate) fn raise() -> std::io::Result<FdLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit; RLIMIT_NOFILE is a valid resource.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    // Linux refuses more than fs.nr_open (1,048,576 by default) even under an infinite hard
    // limit; no node needs more.
    let want = lim.rlim_max.min(1 << 20);
    if want <= before {
        return Ok(FdLimit {
            soft: before,
            hard: lim.rlim_max,
            raised_from: None,
        });
    }
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: `new` is a valid rlimit whose soft limit does not exceed its hard limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(FdLimit {
        soft: want,
        hard: lim.rlim_max,
        raised_from: Some(before),
    })
}

/// The HTTP connections allowed under a soft limit of `soft` descriptors: `configured`, but
/// never more than half of the limit, so that the pipeline keeps the other half.
pub(crate) fn connection_cap(configured: usize, soft: u64) -> usize {
    let half = usize::try_from(soft / 2).unwrap_or(usize::MAX);
    configured.min(half).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_leaves_the_soft_limit_at_the_hard_one_and_the_cap_under_half_of_it() {
        let l = raise().unwrap();
        assert!(l.soft <= l.hard, "{l:?}");
        assert_eq!(l.soft, l.hard.min(1 << 20), "{l:?}");
        assert_eq!(
            raise().unwrap().raised_from,
            None,
            "a second raise changes nothing"
        );
        assert_eq!(connection_cap(1024, 1 << 20), 1024);
        assert_eq!(connection_cap(1024, 256), 128);
        assert_eq!(connection_cap(1024, 1), 1);
    }
}
