"""Format 4's id roots (runtime.merkle): an inclusion proof opens exactly one id of exactly one request.

Every proof the ledger hands out verifies; each counterexample (another id, another salt, an altered
path, index or size, another patch's root) is searched over real trees of many sizes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from prune_edge.ledger import id_proof, record_request
from prune_edge.runtime.errors import RequestError
from prune_edge.runtime.merkle import commit_ids, ids_root, inclusion_proof, merkle_root, root_from_path, verify_id

SALT = bytes(range(16))


def test_rfc6962_vectors_by_hand():
    """Domain separation and the split: leaf = H(0 || c), node = H(1 || l || r), k = largest power of
    two below n (three leaves: node(node(a, b), c)), and the empty tree is H("")."""
    cs = sorted(hashlib.sha256(bytes([i])).hexdigest() for i in range(3))
    leaf = [hashlib.sha256(b"\x00" + bytes.fromhex(c)).digest() for c in cs]
    node = lambda left, right: hashlib.sha256(b"\x01" + left + right).digest()  # noqa: E731
    assert merkle_root(cs) == node(node(leaf[0], leaf[1]), leaf[2]).hex()
    assert merkle_root(cs[:1]) == leaf[0].hex()
    assert merkle_root([]) == hashlib.sha256(b"").hexdigest()
    assert merkle_root(cs[::-1]) == merkle_root(cs)  # the tree is over the sorted commitments


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 200])
def test_every_proof_verifies_and_every_alteration_is_refused(n):
    rng = np.random.default_rng(n)
    ids = sorted(rng.choice(4000, size=n, replace=False).tolist())
    root = ids_root(ids, SALT)
    other_root = ids_root(ids[:-1] + [4001], SALT)  # another patch's request (one id differs)
    outside = next(i for i in range(4000) if i not in ids)
    for i in ids if n <= 13 else ids[:: max(1, n // 20)]:
        proof = inclusion_proof(ids, SALT, i)
        assert verify_id(i, SALT, proof, root)
        assert not verify_id(outside, SALT, proof, root)  # wrong id
        assert not verify_id(i, SALT[::-1], proof, root)  # wrong salt
        assert not verify_id(i, SALT, proof, other_root)  # another patch's root
        for k in range(len(proof["path"])):  # each sibling altered by one bit
            path = list(proof["path"])
            path[k] = f"{int(path[k], 16) ^ (1 << int(rng.integers(256))):064x}"
            assert not verify_id(i, SALT, {**proof, "path": path}, root)
        if proof["path"]:
            assert not verify_id(i, SALT, {**proof, "path": proof["path"][:-1]}, root)  # truncated
            assert not verify_id(i, SALT, {**proof, "path": proof["path"][::-1]}, root) or len(set(proof["path"])) == 1
        assert not verify_id(i, SALT, {**proof, "path": proof["path"] + [root]}, root)  # extended
        for index in {proof["index"] ^ 1, proof["index"] + 1, -1}:
            if index != proof["index"]:
                assert not verify_id(i, SALT, {**proof, "index": index}, root)
    with pytest.raises(ValueError, match=r"expected an id of the request"):
        inclusion_proof(ids, SALT, outside)


def test_a_leaf_cannot_pass_for_a_node():
    """Second-preimage shape: the two children of a root presented as a 'leaf' at the top of a
    one-leaf tree do not reproduce the root (leaves and nodes hash with different prefixes)."""
    cs = commit_ids([1, 2], SALT)
    root = merkle_root(cs)
    left = hashlib.sha256(b"\x00" + bytes.fromhex(cs[0])).hexdigest()
    assert root_from_path(left, 0, 2, [hashlib.sha256(b"\x00" + bytes.fromhex(cs[1])).hexdigest()]) != root
    assert root_from_path(cs[0], 0, 1, []) != root


def test_malformed_proofs_are_refused_not_raised():
    root = ids_root([1, 2, 3], SALT)
    for proof in ({}, {"index": "0", "size": 3, "path": []}, {"index": 0, "size": 3, "path": ["zz" * 32]},
                  {"index": 0, "size": 3, "path": None}, {"index": 5, "size": 3, "path": []},
                  {"index": 0, "size": 3, "path": ["00" * 32] * 65}):
        assert verify_id(1, SALT, proof, root) is False


def test_ledger_proof_opens_the_root_the_patch_carries(tmp_path):
    """The server side: the ledger's record (ids + salt) yields a proof for each id against the root
    the manifest names, and refuses, by name, an id the patch does not forget."""
    ids = [7, 11, 400, 3999, 12]
    root = ids_root(ids, SALT)
    record_request(tmp_path, {"patch_id": "ab" * 16, "ids": ids, "id_salt": SALT.hex()})
    for i in ids:
        proof = id_proof(tmp_path, "ab" * 16, i)
        assert proof["root"] == root and proof["id"] == i
        assert verify_id(i, bytes.fromhex(proof["salt"]), proof, root)
    with pytest.raises(RequestError, match=r"expected id 8 among its 5 point ids"):
        id_proof(tmp_path, "ab" * 16, 8)
