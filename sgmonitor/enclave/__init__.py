"""TRUSTED: the enclave program (the IDS). Makes the session keys, keeps the page cache,
runs IDS checks over typed kernel objects. Imports nothing from the untrusted side."""
