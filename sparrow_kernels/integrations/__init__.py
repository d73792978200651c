"""Optional integrations of Sparrow drafts into serving engines (vLLM today). Nothing else in
sparrow_kernels imports this package; each integration guards its engine's import itself.
"""
