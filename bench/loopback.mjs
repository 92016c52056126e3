// Preloaded into Portkey's gateway (node --import): a server that names no host listens on
// 127.0.0.1 only, not on every interface as Node's default would.
import net from "node:net";

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" || typeof args[0] === "string") {
    if (args.length === 1 || args[1] === undefined || typeof args[1] === "function") {
      args.splice(1, args[1] === undefined ? 1 : 0, "127.0.0.1");
    }
  } else if (args[0] && typeof args[0] === "object" && !args[0].host && !args[0].path) {
    args[0] = { ...args[0], host: "127.0.0.1" };
  }
  return listen.apply(this, args);
};
