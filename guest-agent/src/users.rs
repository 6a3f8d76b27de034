//! The guest's user accounts, as programs are run as them: read from `/etc/passwd`.

use std::path::PathBuf;

/// Where accounts are read.
const PASSWD: &str = "/etc/passwd";

/// One account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The account `name`.
pub fn lookup(name: &str) -> Result<Account, String> {
    let text = std::fs::read_to_string(PASSWD)
        .map_err(|e| format!("cannot read {PASSWD} to find user {name:?}: {e}"))?;
    find(&text, name).ok_or_else(|| format!("no user {name:?} in the guest's {PASSWD}"))
}

/// Every account of a passwd file.
pub fn accounts(text: &str) -> impl Iterator<Item = Account> + '_ {
    text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        let [name, _, uid, gid, _, home, ..] = fields.as_slice() else {
            return None;
        };
        Some(Account {
            name: (*name).to_owned(),
            uid: uid.parse().ok()?,
            gid: gid.parse().ok()?,
            home: PathBuf::from(home),
        })
    })
}

fn find(text: &str, name: &str) -> Option<Account> {
    accounts(text).find(|account| account.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_are_read_from_passwd_lines() {
        let text =
            "root:x:0:0:root:/root:/bin/sh\nbroken line\nuser:x:1000:1000::/home/user:/bin/sh\n";
        assert_eq!(
            find(text, "user"),
            Some(Account {
                name: "user".into(),
                uid: 1000,
                gid: 1000,
                home: PathBuf::from("/home/user"),
            })
        );
        assert_eq!(find(text, "nobody"), None);
        assert_eq!(accounts(text).count(), 2);
    }
}
