"""The Triton implementations of the ops in megaloop.kernels, one module per op.

These modules import triton at their top and define their kernels with ``@triton.jit``, so they
are imported only when an op runs its Triton kernel (megaloop.kernels.dispatch decides that),
never with megaloop.kernels itself. triton.jit chooses between the compiler and the interpreter
when a module is first imported, from TRITON_INTERPRET at that moment: set it before.
"""
