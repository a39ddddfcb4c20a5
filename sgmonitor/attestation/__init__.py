"""TRUSTED, outside the cloud: the attestation service (RFC 9334's verifier).

It endorses enrolled hypervisor keys, issues single-use nonces, verifies enclave
evidence against a policy, and signs a short-lived statement for accepted evidence
only. The hypervisor service and the remote monitor trust its key.
"""
