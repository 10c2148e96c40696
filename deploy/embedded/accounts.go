package embedded

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"github.com/nats-io/nats-server/v2/server"
)

// The two accounts of the embedded server (DESIGN.md invariant 9).
const (
	// InternalAccount owns the event stream, the bucket, the decision inboxes and
	// attrd's own connections. Nothing connects to it without its credentials.
	InternalAccount = "ATTRD_INTERNAL"
	// ClientAccount is where services connect. It imports attrd's request subjects and
	// micro discovery, and nothing else: no JetStream, no access to the internal one.
	ClientAccount = "ATTRD_CLIENT"
	// InternalUser is attrd's own in-process connection (a new password every start).
	InternalUser = "attrd"
	// OperatorUser is the operator tools' connection to the internal account (attrd
	// user create, history, replay), its password in the data dir's credential file.
	OperatorUser = "attrd-operator"
	// AnonymousUser is what a client without credentials is, on a loopback listener
	// with no --client-users.
	AnonymousUser = "anonymous"
)

// ServiceSubjects are the request subjects the client account imports, each request
// answered by one message: every operation of the contract, and no other subject of
// the attrd namespace (the event stream's attrd.events.> and the projectors' feed
// stay unreachable from the client account). No two overlap, nor overlap
// WatchSubjects: a subject two imports matched would reach attrd twice.
var ServiceSubjects = []string{"attrd.user.*", "attrd.session.*", "attrd.history.>",
	"attrd.user.attr.create", "attrd.user.attr.update", "attrd.user.attr.set", "attrd.user.attr.get",
	"attrd.user.attr.delete", "attrd.user.attr.exists", "attrd.user.attr.names",
	"attrd.session.attr.create", "attrd.session.attr.update", "attrd.session.attr.set", "attrd.session.attr.get",
	"attrd.session.attr.delete", "attrd.session.attr.exists", "attrd.session.attr.names",
	"attrd.user.attr.watch.renew.*"}

// WatchSubjects are the watch requests, imported with streamed responses: a watch is
// answered by many messages, and its reply subject stays mapped while they flow
// (nats-server drops the mapping two minutes after the last one; heartbeats keep it).
var WatchSubjects = []string{"attrd.user.attr.watch", "attrd.session.attr.watch"}

// ClientPublish is what a client may publish to: the attrd request namespaces (only
// the imported subjects lead anywhere) and discovery.
var ClientPublish = []string{"attrd.user.>", "attrd.session.>", "attrd.history.>", DiscoverySubjects}

// DiscoverySubjects is micro's discovery, exported streamed so that every instance
// answers a PING or INFO from the client account.
const DiscoverySubjects = "$SRV.>"

// ClientUser is a service's own NATS user in the client account: a password (plain,
// or a bcrypt hash as `nats server passwd` makes) or an nkey. It may subscribe only to
// its own inbox prefix, InboxPrefix(Name), so no service sees another's replies.
type ClientUser struct {
	Name     string `json:"name"`
	Password string `json:"password,omitempty"`
	Nkey     string `json:"nkey,omitempty"`
}

// InboxPrefix is the inbox prefix a client user must use (nats.CustomInboxPrefix).
func InboxPrefix(name string) string { return "_INBOX_" + name }

// Accounts configures the two-account layout.
type Accounts struct {
	// InternalPassword is InternalUser's password (in-process connections only).
	InternalPassword string
	// OperatorPassword is OperatorUser's password (any connection type).
	OperatorPassword string
	// ClientUsers are the services' users; with none, clients connect without
	// credentials as AnonymousUser, which only a loopback listener allows.
	ClientUsers []ClientUser
}

// clientPermissions lets a client send requests on the service subjects and
// discovery, and receive replies on its inboxes: nothing else.
func clientPermissions(inbox string) *server.Permissions {
	return &server.Permissions{
		Publish:   &server.SubjectPermission{Allow: ClientPublish},
		Subscribe: &server.SubjectPermission{Allow: []string{inbox + ".>"}},
	}
}

// configure sets up accounts, exports, imports and users in opts.
func (a *Accounts) configure(opts *server.Options) error {
	internal := server.NewAccount(InternalAccount)
	client := server.NewAccount(ClientAccount)
	for _, subj := range ServiceSubjects {
		if err := internal.AddServiceExport(subj, []*server.Account{client}); err != nil {
			return err
		}
		if err := client.AddServiceImport(internal, subj, subj); err != nil {
			return err
		}
	}
	for _, subj := range append([]string{DiscoverySubjects}, WatchSubjects...) {
		if err := internal.AddServiceExportWithResponse(subj, server.Streamed, []*server.Account{client}); err != nil {
			return err
		}
		if err := client.AddServiceImport(internal, subj, subj); err != nil {
			return err
		}
	}
	opts.Accounts = []*server.Account{internal, client}
	opts.Users = []*server.User{
		{Username: InternalUser, Password: a.InternalPassword, Account: internal,
			AllowedConnectionTypes: map[string]struct{}{"IN_PROCESS": {}}},
		{Username: OperatorUser, Password: a.OperatorPassword, Account: internal},
	}
	if len(a.ClientUsers) == 0 {
		// One anonymous user: its connections can see each other's replies (NATS
		// cannot isolate connections of one user), which is why this is for loopback.
		opts.Users = append(opts.Users, &server.User{Username: AnonymousUser, Account: client,
			Permissions: clientPermissions("_INBOX")})
		opts.NoAuthUser = AnonymousUser
		return nil
	}
	seen := map[string]bool{}
	for _, u := range a.ClientUsers {
		if u.Name == "" || seen[u.Name] || (u.Password == "") == (u.Nkey == "") {
			return fmt.Errorf("client user %q: a unique name and either a password or an nkey", u.Name)
		}
		seen[u.Name] = true
		perms := clientPermissions(InboxPrefix(u.Name))
		if u.Nkey != "" {
			opts.Nkeys = append(opts.Nkeys, &server.NkeyUser{Nkey: u.Nkey, Account: client, Permissions: perms})
		} else {
			opts.Users = append(opts.Users, &server.User{Username: u.Name, Password: u.Password, Account: client, Permissions: perms})
		}
	}
	return nil
}

// enableJetStream gives the internal account JetStream, which the server's options
// cannot do for accounts configured in Go (see reference notes §8.1).
func enableJetStream(ns *server.Server) error {
	acc, err := ns.LookupAccount(InternalAccount)
	if err != nil {
		return err
	}
	return acc.EnableJetStream(nil, nil)
}

// migrateGlobalStore moves a store written before the two accounts (under the global
// account) to the internal account, once, so that an upgrade keeps its data.
func migrateGlobalStore(storeDir string) (bool, error) {
	global := filepath.Join(storeDir, "jetstream", server.DEFAULT_GLOBAL_ACCOUNT)
	internal := filepath.Join(storeDir, "jetstream", InternalAccount)
	if _, err := os.Stat(global); err != nil {
		return false, nil
	}
	if _, err := os.Stat(internal); err == nil {
		return false, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return false, err
	}
	return true, os.Rename(global, internal)
}

// IsLoopback reports whether a listen address (host:port) is on loopback only.
func IsLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// NewSecret returns a random password.
func NewSecret() string {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand does not fail on supported platforms
	}
	return base64.RawURLEncoding.EncodeToString(b)
}
