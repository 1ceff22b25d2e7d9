"""The drafting policy: what each step drafts, from estimates of acceptance and of cost."""
