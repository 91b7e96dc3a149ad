"""Who is calling and what they may do: principals and scopes, access tokens (JWT), API keys,
pairing, the signing key and the one access policy."""
