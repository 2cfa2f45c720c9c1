"""Who may do what and what is kept: accounts and keys, retention, sealed content, stored
completions, the audit log."""
