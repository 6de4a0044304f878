// A real OIDC provider (node-oidc-provider) for tests/gateway_core/test_access_oidc.py.
//
// Configured from the environment: OIDC_PORT (on 127.0.0.1), OIDC_CLIENTS (JSON list of
// client metadata), OIDC_ACCOUNTS (JSON {id: {email, groups}}).  It signs with an RSA
// key made at start (so a restart is a key rotation), puts the requested claims in the
// ID token, and logs users in through its development login form (any password).
// Prints "ready <kid>" once listening.
import crypto from "node:crypto";
import Provider from "oidc-provider";

const port = Number(process.env.OIDC_PORT);
const accounts = JSON.parse(process.env.OIDC_ACCOUNTS || "{}");
const clients = JSON.parse(process.env.OIDC_CLIENTS || "[]");

const { privateKey } = crypto.generateKeyPairSync("rsa", { modulusLength: 2048 });
const jwk = privateKey.export({ format: "jwk" });
jwk.kid = crypto.randomBytes(8).toString("hex");
jwk.use = "sig";
jwk.alg = "RS256";

const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients,
  jwks: { keys: [jwk] },
  cookies: { keys: [crypto.randomBytes(32).toString("hex")] },
  conformIdTokenClaims: false,
  scopes: ["openid", "email", "profile", "groups"],
  claims: {
    openid: ["sub"],
    email: ["email", "email_verified"],
    profile: ["preferred_username"],
    groups: ["groups"],
  },
  features: { devInteractions: { enabled: true } },
  pkce: { required: () => true },
  async findAccount(ctx, id) {
    const account = accounts[id];
    if (!account) return undefined;
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          email: account.email,
          email_verified: true,
          preferred_username: id,
          groups: account.groups || [],
        };
      },
    };
  },
});

const server = provider.listen(port, "127.0.0.1", () => {
  console.log(`ready ${jwk.kid}`);
});
process.on("SIGTERM", () => server.close(() => process.exit(0)));
