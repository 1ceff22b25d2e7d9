"""Where draft tokens come from: one drafter per file behind one small interface (base.py).

* :mod:`~mtpcode.drafters.heads` - the bundle's multi-token-prediction heads;
* :mod:`~mtpcode.drafters.context` - prompt lookup over the text so far and the text after the cursor;
* :mod:`~mtpcode.drafters.extended` - a context draft that the heads carry on where it ends.

The speculation loop (:mod:`mtpcode.speculative`) asks the drafter the policy
chose for a draft, verifies it, and tells every drafter what was committed.
A new drafter implements :class:`~mtpcode.drafters.base.Drafter`; the loop
does not change.
"""
