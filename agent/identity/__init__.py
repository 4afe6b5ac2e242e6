"""The identity wing: a managed identity's access token, from whichever endpoint.

``tokens`` decides *when* to ask, and caches; ``request`` is the seam between
when and *how*; ``imds``, ``arc`` and ``app_service`` are the hows; ``selector``
is the manifest's ``identity:`` value. It knows nothing of Key Vault.
"""
