"""The C ABI of the runtime: ``unidg.h`` and the cffi embedding-mode build of ``libunidg.so``."""
