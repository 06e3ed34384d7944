// Command etcd is the etcd server from go.etcd.io/etcd/server/v3, at the version
// that k8s.io/kubernetes requires (etcdmain is a library; etcd's own main lives
// in a module outside the kubernetes module graph).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
