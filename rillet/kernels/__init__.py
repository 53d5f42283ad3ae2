"""C++ CPU kernels, compiled on first use and cached; each has a pure-torch fallback at its call site."""
