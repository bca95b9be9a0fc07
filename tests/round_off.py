"""Float32 round-off between machines, for tests that compare with descriptors stored in ``tests/data``.

XLA:CPU picks its convolution and matmul kernels, and so their summation order, by the CPU it runs on (its
instruction set and cache sizes). Stored descriptors are therefore reproduced bit for bit only on the kind of
machine that recorded them. Measured against the stored fixtures: the 0.1.0 fixtures differ by up to 2.5e-7 on an
AMD EPYC with AVX-512 (bit for bit where they were recorded) and by up to 3.1e-7 with ``XLA_FLAGS=
--xla_cpu_max_isa=SSE4_2``; ``precision_v0_2`` (recorded on that EPYC, bit for bit there) by up to 2.8e-7 with
SSE4_2 and 2.4e-7 with AVX. A changed operation moves these unit-norm descriptors by 1e-4 or more, so a 1e-6
bound still catches any change of the computation.
"""

CROSS_CPU_ATOL = 1e-6
