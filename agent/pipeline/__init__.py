"""The pipeline wing: values and pure functions between a fetch and a file.

``sources`` (what to fetch, and what came back), ``transforms`` and
``certificates`` (bytes in, bytes out; ``der`` and ``pkcs12`` read with bounded
work what a library must not be handed unchecked), ``outputs`` (the files and
sets an entry becomes) and ``expiry``. No I/O (the ``pure-pipeline-values``
contract).
"""
