"""Sample alignment for vertical FL: ECDH private set intersection + a jointly seeded shuffle.

``ecdh`` holds the pure math (hash to curve25519, X25519 blinding, set operations);
``align`` runs the MPI protocol and writes ``RUN_DIR/align/party_K.h5``; ``config``
is the validated ``hpcfed align`` config.
"""
