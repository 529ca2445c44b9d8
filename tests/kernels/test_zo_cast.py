"""AMP's host pass: the fused update of the fp32 master and its cast to the bfloat16/float16 wire copy
(``zo_perturb_(master, ..., out=wire)``) against torch doing the two steps (the unfused update, then
``.to(dtype)``). The master must be the same bits, and the wire copy the same bits as torch's cast, which
rounds to nearest even: ties both ways, subnormals, overflow to inf, signed zeros. NaN must stay NaN (its
payload is not compared: torch's own cast gives 0x7FC0 on its scalar path and 0xFFFF on its vector path)."""

import pytest
import torch

import memtrain._cpp
from memtrain._cpp import cpp_available
from memtrain.kernels import zo_perturb as Z


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def f32(words: list[int]) -> torch.Tensor:
    return torch.tensor(words, dtype=torch.int64).to(torch.int32).view(torch.float32)


# fp32 bit patterns where the cast must decide: bf16 ties (low 16 bits 0x8000) to even and odd neighbours,
# just below and above a tie, fp16 ties (1 + 2^-11, 1 + 3·2^-11), fp16 subnormals and their ties (2^-25,
# 3·2^-25), fp16 overflow (65519 -> 65504, 65520 -> inf), fp32 subnormals, ±0, ±inf, NaNs, the largest fp32.
SPECIAL = f32([0x3F808000, 0x3F818000, 0xBF808000, 0x3F807FFF, 0x3F808001, 0x3F801000, 0x3F803000, 0x33000000,
               0x33400000, 0x337FFFFF, 0x38800000 - 1, 0x477FEF00, 0x477FF000, 0x00000001, 0x00400000, 0x807FFFFF,
               0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x7F7FFFFF,
               0x00008000, 0x00018000, 0x0001FFFF])


def masters(seed: int) -> torch.Tensor:
    """Special values, every fp32 bit pattern class at random (NaNs, infs, subnormals included) and
    ordinary weights; 5000+ elements, so the C++ pass splits them over threads and partial blocks."""
    g = torch.Generator().manual_seed(seed)
    random_bits = torch.randint(-2**31, 2**31, (3000,), generator=g, dtype=torch.int64).to(torch.int32)
    weights = torch.randn(2013, generator=g) * 0.02
    return torch.cat([SPECIAL, random_bits.view(torch.float32), weights])


def assert_same_cast(wire: torch.Tensor, reference: torch.Tensor) -> None:
    nan = reference.isnan()
    assert torch.equal(wire.isnan(), nan), "NaN positions differ"
    diff = (bits(wire) != bits(reference)) & ~nan
    assert not diff.any(), (f"{int(diff.sum())} elements differ, e.g. {wire[diff][:4].tolist()} vs "
                            f"{reference[diff][:4].tolist()}")


# (seeds, coefs, c): only a cast (p unchanged where finite), an update with decay, and c > 0 that pushes the
# largest values past fp32's range (inf after the update, inf in the wire copy)
PASSES = {"cast-only": ([], [], 0.0), "update": ([7, 2**63 + 1], [1e-3, -2e-3], -1e-4), "grow": ([], [], 0.5)}


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(PASSES))
def test_fused_update_and_cast_equal_torch_bit_for_bit(monkeypatch, backend, dtype, name):
    if backend == "cpp" and not cpp_available():
        pytest.fail("the C++ extension did not build; see the install log")
    if backend == "torch":
        monkeypatch.setattr(Z, "cpp_available", lambda: False)
        monkeypatch.setattr(memtrain._cpp, "_warned", {"zo_perturb_"})
    seeds, coefs, c = PASSES[name]
    master = masters(3)
    reference = master.clone()
    Z._zo_perturb_torch(reference, seeds, coefs, 5, c, 0, 64)  # the unfused update (all backends agree on it)
    wire = torch.empty(master.shape, dtype=dtype)
    Z.zo_perturb_(master, seeds, coefs, stream=5, c=c, offset=64, out=wire)
    same = bits(master) == bits(reference)
    assert (same | (master.isnan() & reference.isnan())).all(), "the master differs from the unfused update"
    assert_same_cast(wire, reference.to(dtype))
    if name == "grow":
        assert wire.isinf().any()
    if name == "cast-only":
        w = wire.float().abs()
        assert ((w > 0) & (w < torch.finfo(dtype).tiny)).any()  # subnormal results exercised


def test_out_must_be_a_low_precision_copy_of_the_same_size():
    p = torch.zeros(8)
    with pytest.raises(ValueError, match="out must be"):
        Z.zo_perturb_(p, [], [], out=torch.empty(8))
    with pytest.raises(ValueError, match="elements"):
        Z.zo_perturb_(p, [], [], out=torch.empty(7, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="float32"):
        Z.zo_perturb_(p.double(), [], [], out=torch.empty(8, dtype=torch.bfloat16))
