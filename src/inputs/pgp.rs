//! OpenPGP verification in-process (rpgp): detached and clearsigned signatures by pinned keys.
