//! The user database every image gets, so that programs that look up the
//! current user (`whoami`, git, ssh, servers dropping to `nobody`) work,
//! and who an image runs as: root, or with the `nonroot` meta-package a
//! numeric non-root user that `runAsNonRoot` admits.
//!
//! Every image has the same accounts, whichever user it runs as (as
//! distroless images do), so the symlink layer depends on the package set
//! alone and `shell` and `shell/nonroot` differ only in their config.

/// Who an image runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ImageUser {
    #[default]
    Root,
    /// The `nonroot` meta-package: [`USER_NAME`], [`USER_ID`]:[`USER_ID`].
    NonRoot,
}

/// The `nonroot` meta-package.
pub const NONROOT: &str = "nonroot";
/// The non-root account's name, uid and gid (as Debian's first user).
pub const USER_NAME: &str = "user";
pub const USER_ID: u32 = 1000;
pub const USER_HOME: &str = "/home/user";
/// The conventional uid and gid of `nobody` / `nogroup`.
pub const NOBODY_ID: u32 = 65534;
/// The login shell of accounts in an image without `/bin/sh`; it need not
/// exist (a login is refused either way).
pub const NOLOGIN: &str = "/sbin/nologin";
/// `LANG` in every image: glibc knows `C.UTF-8` without locale files.
pub const LANG: &str = "C.UTF-8";

impl ImageUser {
    /// `HOME` in the image config.
    pub fn home(self) -> &'static str {
        match self {
            ImageUser::Root => "/root",
            ImageUser::NonRoot => USER_HOME,
        }
    }

    /// The config's `User`: numeric, so a cluster can tell it is not root
    /// without looking into the image; none for root (the default).
    pub fn config_user(self) -> Option<String> {
        match self {
            ImageUser::Root => None,
            ImageUser::NonRoot => Some(format!("{USER_ID}:{USER_ID}")),
        }
    }

    /// How the user is named in image cache keys.
    pub fn key(self) -> &'static str {
        match self {
            ImageUser::Root => "root",
            ImageUser::NonRoot => NONROOT,
        }
    }
}

/// `/etc/passwd`; `shell` is the login shell of root and the user.
pub fn passwd(shell: &str) -> String {
    format!(
        "root:x:0:0:root:/root:{shell}\n\
         {USER_NAME}:x:{USER_ID}:{USER_ID}:{USER_NAME}:{USER_HOME}:{shell}\n\
         nobody:x:{NOBODY_ID}:{NOBODY_ID}:nobody:/nonexistent:{NOLOGIN}\n"
    )
}

/// `/etc/group`.
pub fn group() -> String {
    format!("root:x:0:\n{USER_NAME}:x:{USER_ID}:\nnogroup:x:{NOBODY_ID}:\n")
}

/// `/etc/nsswitch.conf`: the files above, and DNS after `/etc/hosts`.
pub const NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_parse_as_their_fields() {
        let passwd = passwd("/bin/sh");
        let users: Vec<Vec<&str>> = passwd.lines().map(|l| l.split(':').collect()).collect();
        assert_eq!(users.len(), 3);
        assert!(users.iter().all(|u| u.len() == 7));
        assert_eq!(
            users[0],
            ["root", "x", "0", "0", "root", "/root", "/bin/sh"]
        );
        assert_eq!(users[1][..4], ["user", "x", "1000", "1000"]);
        assert_eq!(users[1][5], ImageUser::NonRoot.home());
        assert_eq!(users[2][..4], ["nobody", "x", "65534", "65534"]);
        assert_eq!(users[2][6], NOLOGIN);
        let group = group();
        let groups: Vec<Vec<&str>> = group.lines().map(|l| l.split(':').collect()).collect();
        assert_eq!(groups[0], ["root", "x", "0", ""]);
        assert_eq!(groups[1], ["user", "x", "1000", ""]);
        assert_eq!(groups[2], ["nogroup", "x", "65534", ""]);
        assert_eq!(
            ImageUser::NonRoot.config_user().as_deref(),
            Some("1000:1000")
        );
        assert_eq!(ImageUser::Root.config_user(), None);
    }
}
