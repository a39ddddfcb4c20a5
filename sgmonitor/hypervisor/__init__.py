"""TRUSTED: the hypervisor service, the only party holding guest RAM and vCPU registers.
Translates with the vCPU's CR3 and returns pages sealed for the enclave."""
