"""UNTRUSTED: the SGmonitor library. Hosts the enclave process and relays its sealed
requests to the hypervisor service; sees ciphertext only."""
