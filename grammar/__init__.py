"""The policy grammar, shipped as package data (installed as policyc.grammar).

Stage: the DSL's grammar (`policy.lark`), the definition `policyc.dsl_lark` parses with; data, no code.
May import: nothing.
"""
