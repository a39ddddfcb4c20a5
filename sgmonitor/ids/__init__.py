"""IDS checks written against typed kernel objects; they run inside the enclave (or in
the traditional baseline process) and never see the transport underneath."""
